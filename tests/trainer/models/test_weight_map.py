"""HF ↔ megatron weight maps: exact round trips, the QKV layout, and logit equality with transformers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.models.build import build_gpt_model
from trainer.models.config import hf_config
from trainer.models.weight_map import hf_names, hf_to_mcore, mcore_to_hf, rules

DENSE = ["tiny-qwen2.5", "tiny-qwen3"]


def tied(model):
    """The same model with input embedding and output head shared (small Qwen2.5 sizes ship this way)."""
    return model.model_copy(update={"shape": model.shape.model_copy(update={"tie_embeddings": True})})


def perturbed_gpt(model, randomize, seed=0):
    """A GPTModel whose every parameter (norms and biases too) is random (conftest's ``randomize``)."""
    return randomize(build_gpt_model(model, seed=seed).eval(), seed + 1)


def mcore_params(gpt):
    return {k: v.detach() for k, v in gpt.named_parameters()}


@pytest.mark.parametrize("name", DENSE)
def test_round_trip_is_exact(matrix, groups, name, randomize):
    model = matrix.models[name]
    params = mcore_params(perturbed_gpt(model, randomize))
    hf = mcore_to_hf(params, model.shape)
    assert list(hf) == hf_names(model.shape)
    back = hf_to_mcore(hf, model.shape)
    assert set(back) == set(params) == {r.mcore for r in rules(model.shape)}
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_qkv_is_interleaved_per_query_group(matrix):
    """Rows of linear_qkv for group g are [q heads of g, k_g, v_g]; build them by hand and compare."""
    shape = matrix.models["tiny-qwen2.5"].shape  # 4 heads, 2 groups, head dim 16
    hd, hpg = 16, 2
    hf = {
        f"model.layers.0.self_attn.{p}_proj.weight": torch.randn(n * hd, 64)
        for p, n in zip("qkv", (4, 2, 2), strict=True)
    }
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    expected = torch.cat(
        [
            q[0 : hpg * hd],
            k[0:hd],
            v[0:hd],  # group 0: heads 0, 1
            q[hpg * hd : 2 * hpg * hd],
            k[hd : 2 * hd],
            v[hd : 2 * hd],  # group 1: heads 2, 3
        ]
    )
    rule = next(r for r in rules(shape) if r.mcore == "decoder.layers.0.self_attention.linear_qkv.weight")
    assert torch.equal(rule.to_mcore(q, k, v), expected)


def test_unknown_or_missing_hf_names_are_errors(matrix):
    shape = matrix.models["tiny-qwen3"].shape
    hf = {n: torch.zeros(1) for n in hf_names(shape)}
    with pytest.raises(KeyError, match="no megatron counterpart"):
        hf_to_mcore({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(1)}, shape)  # a qwen2 name
    del hf["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        hf_to_mcore(hf, shape)


@pytest.mark.parametrize("name,tie", [(n, False) for n in DENSE] + [("tiny-qwen2.5", True)])
def test_logits_equal_transformers(matrix, groups, name, tie, randomize):
    """mcore GPTModel and transformers' Qwen2/Qwen3ForCausalLM with mapped weights give the same logits."""
    model = tied(matrix.models[name]) if tie else matrix.models[name]
    gpt = perturbed_gpt(model, randomize)
    hf_model = AutoModelForCausalLM.from_config(hf_config(model), attn_implementation="sdpa").eval()
    assert (
        type(hf_model).__name__
        == {"tiny-qwen2.5": "Qwen2ForCausalLM", "tiny-qwen3": "Qwen3ForCausalLM"}[name]
    )
    result = hf_model.load_state_dict(mcore_to_hf(mcore_params(gpt), model.shape), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if tie else [])  # tied: lm_head *is* embed_tokens
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tie
    ids = torch.randint(0, model.shape.vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gpt(ids, torch.arange(40).expand(3, 40), None)
        theirs = hf_model(ids).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_tied_model_has_no_output_layer(matrix, groups):
    model = tied(matrix.models["tiny-qwen2.5"])
    params = mcore_params(build_gpt_model(model, seed=0))
    assert "output_layer.weight" not in params and "lm_head.weight" not in hf_names(model.shape)
    hf = mcore_to_hf(params, model.shape)
    # a checkpoint that stores the tied head as well (as save_pretrained does) loads
    back = hf_to_mcore({**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}, model.shape)
    assert set(back) == set(params)
