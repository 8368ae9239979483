"""The family registry: each built family's bundle, its config.json reading, and the preflight's table."""

import pytest

from trainer.models.families import BUILT_FAMILIES, bundle_of, family, family_of_hf
from trainer.models.families.bundle import UnsupportedConfig

TINY = {"qwen2": "tiny-qwen2.5", "qwen3": "tiny-qwen3", "deepseek_v3": "tiny-moonlight",
        "qwen3_next": "tiny-qwen3-next"}


def test_preflight_table_is_the_registry():
    assert BUILT_FAMILIES["megatron"] == tuple(n for n in TINY if n in BUILT_FAMILIES["megatron"])
    for name in BUILT_FAMILIES["megatron"]:
        assert family(name).name == name


@pytest.mark.parametrize("name", BUILT_FAMILIES["megatron"])
def test_config_json_reads_back_to_the_shape(matrix, name):
    """hf_config(model) written as config.json and read by the family gives the model's shape back."""
    model = matrix.models[TINY[name]]
    bundle = family(name)
    config = bundle.hf_config(model).to_dict()
    assert family_of_hf(config["model_type"]) is bundle
    expected = model.shape
    if expected.moe is not None:  # the router's dtype is a training setting that config.json does not carry
        expected = expected.model_copy(update={"moe": expected.moe.model_copy(update={"router_dtype": "fp32"})})
    assert bundle.shape_from_hf(config) == expected


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("qwen2", "use_sliding_window", True),
        ("qwen2", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("qwen3", "hidden_act", "gelu"),
        ("qwen3", "some_new_switch", 1),
        ("qwen3_next", "layer_types", ["full_attention"] * 4),
        ("qwen3_next", "mlp_only_layers", [0]),
        ("qwen3_next", "norm_topk_prob", False),
    ],
)
def test_unsupported_config_field_is_named(matrix, name, field, value):
    config = {**family(name).hf_config(matrix.models[TINY[name]]).to_dict(), field: value}
    with pytest.raises(UnsupportedConfig, match=f"'{field}'"):
        family(name).shape_from_hf(config)


def test_unknown_model_type_is_refused():
    with pytest.raises(LookupError, match="llama"):
        family_of_hf("llama")


def test_shape_lookup_shares_dense_rules(matrix):
    """Weight sync passes a bare shape; every dense family has the same rules, so the lookup is unambiguous."""
    assert family("qwen2").rules is family("qwen3").rules
    assert bundle_of(matrix.models["tiny-qwen3"].shape).rules is family("qwen3").rules
