"""Pretrained weights: a backend built with a weights directory holds exactly its tensors, whatever the kind of
directory and the backend; a directory that does not fit the recipe's model is refused in one line."""

import json

import pytest
import torch

from matrix.schema import Layout, Model
from trainer.backends.base import build_backend
from trainer.config import resolve
from trainer.convert.hf_mcore import hf_to_mcore
from trainer.models import pretrained
from trainer.models.hf_checkpoint import load_hf_checkpoint
from trainer.models.weight_files import MCORE_META
from trainer.parallel.process_groups import process_groups

SINGLE = Layout()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, matrix, save_tiny_hf):
    """tiny-qwen3 as an HF checkpoint (sharded) and as its megatron-core conversion."""
    root = tmp_path_factory.mktemp("weights")
    hf = save_tiny_hf(matrix.models["tiny-qwen3"], root / "hf", seed=7)
    return {"hf": hf, "mcore": hf_to_mcore(hf, root / "mcore")}


@pytest.mark.parametrize("recipe", ["tiny-qwen3", "tiny-qwen3-fsdp"])
@pytest.mark.parametrize("kind", ["hf", "mcore"])
def test_backend_starts_from_the_directory_not_from_the_seed(dirs, recipe, kind):
    r = resolve(recipe, {})
    expected, _ = load_hf_checkpoint(dirs["hf"])
    with process_groups(r.layout):
        loaded = dict(build_backend(r, seed=1, weights=dirs[kind]).hf_named_tensors())
        seeded = dict(build_backend(r, seed=1).hf_named_tensors())
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert not torch.equal(seeded["model.layers.0.mlp.up_proj.weight"], expected["model.layers.0.mlp.up_proj.weight"])


def test_hub_snapshot_in_the_cache_is_the_source_when_weights_is_unset(dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(dirs["hf"], target_is_directory=True)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = resolve("tiny-qwen3", {"model.hf_id": "acme/tiny"}).model
    assert pretrained.check(model, "tiny-qwen3", SINGLE, "single") == snapshot
    # a hub release that does not fit, of a model with prepare steps: the refusal says how to prepare it
    other = model.model_copy(update={"shape": model.shape.model_copy(update={"ffn_hidden": 256}),
                                     "prepare": resolve("qwen2.5-7b", {}).model.prepare})
    with pytest.raises(pretrained.WeightsError, match=r"^the hub snapshot of acme/tiny: .*shape.ffn_hidden is 128 "
                       r"there.*; run its prepare steps \(`python -m trainer.convert prepare tiny-qwen3 "):
        pretrained.check(other, "tiny-qwen3", SINGLE, "single")
    assert pretrained.source(resolve("tiny-qwen3", {"model.hf_id": "acme/absent"}).model) is None
    assert pretrained.source(resolve("tiny-qwen3", {}).model) is None  # a tiny stand-in: random init


def _sharded(dirs, tmp_path):
    meta = json.loads((dirs["mcore"] / MCORE_META).read_text()) | {"layout": "tp2", "degrees": {"tp": 2, "pp": 1}}
    (tmp_path / MCORE_META).write_text(json.dumps(meta))
    return tmp_path


def _without_a_tensor(dirs, tmp_path):
    index = json.loads((dirs["hf"] / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    for f in dirs["hf"].iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


REFUSALS = [
    ("tiny-qwen2.5", {}, lambda d, t: d["hf"], "family is 'qwen3' there but 'qwen2' in matrix model"),
    ("tiny-qwen3", {"model.shape.ffn_hidden": 256}, lambda d, t: d["mcore"], "shape.ffn_hidden is 128 there but 256"),
    ("tiny-qwen3", {}, lambda d, t: t / "absent", "absent: not a directory"),
    ("tiny-qwen3", {}, lambda d, t: t, "no weights found; expected config.json with model.safetensors"),
    ("tiny-qwen3", {}, _sharded, "sharded for layout tp2 (tp=2 pp=1), but the run's layout single has tp=1 pp=1 ep=1 "
     "etp=1; convert the HF checkpoint again with `--layout single`, or without --layout (unsharded)"),
    ("tiny-qwen3-fsdp", {}, _sharded, "a sharded megatron-core directory (layout tp2) and an FSDP run (layout fsdp2): "
     "FSDP reads an HF checkpoint or an unsharded conversion"),
    ("tiny-qwen3", {}, _without_a_tensor, "tensor 'model.norm.weight' is missing"),
]


@pytest.mark.parametrize(("recipe", "overrides", "directory", "words"), REFUSALS,
                         ids=["family", "shape", "missing", "empty", "sharded-other-degrees", "sharded-fsdp", "incomplete"])
def test_a_directory_that_does_not_fit_is_refused_in_one_line(dirs, tmp_path, recipe, overrides, directory, words):
    where = directory(dirs, tmp_path)
    r = resolve(recipe, overrides | {"model.weights": str(where)})
    with pytest.raises(pretrained.WeightsError) as exc:
        pretrained.check(r.model, recipe, r.layout, r.recipe.layout)
    message = str(exc.value)
    assert message.startswith("model.weights: ") and words in message and "\n" not in message, message


def test_fsdp_ranks_refuse_a_sharded_directory_too(dirs, tmp_path):
    with pytest.raises(pretrained.WeightsError, match="mcore-sharded directory cannot be read as whole tensors"):
        pretrained.hf_tensors(_sharded(dirs, tmp_path), Model.model_validate(
            json.loads((dirs["mcore"] / MCORE_META).read_text())["model"]))


def test_hybrid_checkpoint_loads_every_parameter(tmp_path, matrix, save_tiny_hf):
    """Qwen3-Next (gated delta net, gated attention, MoE with a gated shared expert): built without megatron's
    initialisation, every parameter comes from the file."""
    r = resolve("tiny-qwen3-next", {})
    expected, _ = load_hf_checkpoint(save_tiny_hf(matrix.models["tiny-qwen3-next"], tmp_path / "hf", seed=5))
    with process_groups(r.layout):
        loaded = dict(build_backend(r, seed=1, weights=tmp_path / "hf").hf_named_tensors())
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_moe_checkpoint_loads_every_parameter_and_the_routers_expert_bias(tmp_path, matrix, save_tiny_hf):
    r = resolve("tiny-moonlight", {})
    expected, _ = load_hf_checkpoint(save_tiny_hf(matrix.models["tiny-moonlight"], tmp_path / "hf", seed=3))
    with process_groups(r.layout):
        backend = build_backend(r, seed=1, weights=tmp_path / "hf")
        loaded = dict(backend.hf_named_tensors())
        biases = {name: b for name, b in backend.model.named_buffers() if name.endswith("router.expert_bias")}
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name
    assert biases
    for name, bias in biases.items():
        layer = name.split(".")[2]
        assert torch.equal(bias, expected[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]), name


def test_router_training_settings_are_not_the_checkpoints_to_say(matrix):
    """qwen3-next trains its router in fp64 (a recipe setting); the config.json it is prepared from, read back,
    says the default: the run must not refuse its own prepared weights. The weights' own fields still count."""
    from trainer.models.pretrained import first_difference

    ours = matrix.models["qwen3-next-80b-a3b"]
    moe = ours.shape.moe
    assert moe.router_dtype == "fp64"

    def with_moe(**update):
        return ours.model_copy(update={"shape": ours.shape.model_copy(update={"moe": moe.model_copy(update=update)})})

    assert first_difference(ours, with_moe(router_dtype="fp32", expert_bias=True, bias_update_rate=1e-3)) is None
    assert first_difference(ours, with_moe(experts=8)) == ("shape.moe.experts", moe.experts, 8)
