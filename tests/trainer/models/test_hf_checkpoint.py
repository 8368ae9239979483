"""HF checkpoints: written atomically, read back by us and by transformers' from_pretrained."""

import json

import torch
from transformers import AutoModelForCausalLM

from trainer.models.config import hf_config
from trainer.models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from trainer.models.weight_map import hf_names


def random_tensors(model, seed=0):
    ref = AutoModelForCausalLM.from_config(hf_config(model))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}


def test_save_load_and_from_pretrained(matrix, tmp_path):
    model = matrix.models["tiny-qwen3"]
    tensors = random_tensors(model)
    out = save_hf_checkpoint(tmp_path / "ckpt", tensors, hf_config(model))
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    loaded, config = load_hf_checkpoint(out)
    assert config.model_type == "qwen3" and config.head_dim == 16
    assert set(loaded) == set(tensors) == set(hf_names(model.shape))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(torch.equal(v, tensors[k]) for k, v in hf_model.state_dict().items())


def test_overwrite_is_atomic_and_leaves_no_temporaries(matrix, tmp_path):
    model = matrix.models["tiny-qwen2.5"]
    save_hf_checkpoint(tmp_path / "ckpt", random_tensors(model, 0), hf_config(model))
    second = random_tensors(model, 1)
    save_hf_checkpoint(tmp_path / "ckpt", second, hf_config(model))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_hf_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(loaded[k], second[k]) for k in second)


def test_sharded_index_is_read(matrix, tmp_path):
    """Hub checkpoints come as shards listed in model.safetensors.index.json."""
    from safetensors.torch import save_file

    model = matrix.models["tiny-qwen2.5"]
    tensors = random_tensors(model)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    hf_config(model).save_pretrained(tmp_path)
    loaded, _ = load_hf_checkpoint(tmp_path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
