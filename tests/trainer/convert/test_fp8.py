"""fp8 (e4m3, 128×128 weight_scale_inv blocks) → bf16 against a plain block-by-block dequantisation."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.convert.__main__ import main
from trainer.models.weight_files import HF_INDEX

B = 128


def plain_dequantisation(weight, scale_inv):
    """Block by block, written out: element (r, c) is multiplied by scale_inv[r // 128, c // 128]."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = (slice(i * B, (i + 1) * B), slice(j * B, (j + 1) * B))
            out[block] = weight[block].float() * scale_inv[i, j]
    return out.to(torch.bfloat16)


def fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.fixture
def fp8_dir(tmp_path):
    """Two shards; ragged 300×200 weight (scales 3×2) whose scale sits in the *other* shard; a bf16 norm."""
    root = tmp_path / "fp8"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.layers.0.mlp.down_proj.weight": fp8((300, 200), 1),
            "model.layers.0.input_layernorm.weight": torch.randn(64, generator=g).to(torch.bfloat16),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.0.mlp.down_proj.weight_scale_inv": torch.rand(3, 2, generator=g) + 0.01,
            "model.layers.0.self_attn.o_proj.weight": fp8((128, 256), 2),
            "model.layers.0.self_attn.o_proj.weight_scale_inv": torch.rand(1, 2, generator=g) + 0.01,
        },
    }
    for name, tensors in shards.items():
        save_file(tensors, root / name)
    index = {"metadata": {}, "weight_map": {k: f for f, ts in shards.items() for k in ts}}
    (root / HF_INDEX).write_text(json.dumps(index))
    config = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "weight_block_size": [B, B]}}
    (root / "config.json").write_text(json.dumps(config))
    return root, {k: v for ts in shards.values() for k, v in ts.items()}


def test_cast_equals_plain_dequantisation(fp8_dir, tmp_path, read_checkpoint):
    src, original = fp8_dir
    assert main(["fp8-to-bf16", str(src), str(tmp_path / "bf16")]) == 0
    index, out = read_checkpoint(tmp_path / "bf16")
    assert set(out) == set(index) == {k for k in original if not k.endswith("_scale_inv")}
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        expected = plain_dequantisation(original[name], original[name + "_scale_inv"])
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected)
    # the ragged corner block (rows 256..299, cols 128..199) uses scale [2, 1]
    corner = original["model.layers.0.mlp.down_proj.weight"][256:, 128:].float()
    scale = original["model.layers.0.mlp.down_proj.weight_scale_inv"][2, 1]
    assert torch.equal(out["model.layers.0.mlp.down_proj.weight"][256:, 128:], (corner * scale).to(torch.bfloat16))
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(out[norm], original[norm])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_an_interrupted_cast_resumes(fp8_dir, tmp_path, read_checkpoint):
    src, _ = fp8_dir
    out = tmp_path / "bf16"
    main(["fp8-to-bf16", str(src), str(out)])
    _, complete = read_checkpoint(out)
    # as if killed after the first shard: no index, no second shard
    (out / HF_INDEX).unlink()
    (out / "model-00002-of-00002.safetensors").unlink()
    kept = (out / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    assert main(["fp8-to-bf16", str(src), str(out)]) == 0
    assert (out / "model-00001-of-00002.safetensors").stat().st_mtime_ns == kept  # not redone
    _, resumed = read_checkpoint(out)
    assert set(resumed) == set(complete) and all(torch.equal(resumed[k], complete[k]) for k in complete)
    assert main(["fp8-to-bf16", str(src), str(out)]) == 2  # complete: refused, nothing overwritten


def test_wrong_scale_shape_is_named(fp8_dir, tmp_path, capsys):
    src, original = fp8_dir
    tensors = load_file(src / "model-00002-of-00002.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, src / "model-00002-of-00002.safetensors")
    assert main(["fp8-to-bf16", str(src), str(tmp_path / "bf16")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj.weight" in err and "(3, 2)" in err


def test_config_prepare_steps(fp8_dir, capsys):
    src, _ = fp8_dir
    assert main(["drop-config-key", str(src), "quantization_config"]) == 0
    assert main(["set-config", str(src), "num_nextn_predict_layers=0",
                 'auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}']) == 0
    config = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    assert main(["drop-config-key", str(src), "quantization_config"]) == 0  # idempotent
    assert "had no" in capsys.readouterr().out
    assert main(["set-config", str(src), "novalue"]) == 2
