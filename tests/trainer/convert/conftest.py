"""Tiny HF checkpoints saved sharded (with model.safetensors.index.json), as the hub ships large models."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer.convert.shards import HF_INDEX
from trainer.models.config import hf_config


def save_tiny_hf(model, directory, randomize, *, seed=0, shard="40KB"):
    """A transformers model of ``model``'s config with random weights (norms, expert bias too), sharded."""
    torch.manual_seed(seed)
    hf = randomize(AutoModelForCausalLM.from_config(hf_config(model)), seed + 1)
    hf.save_pretrained(directory, max_shard_size=shard)
    return directory


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, matrix, randomize):
    root = tmp_path_factory.mktemp("hf")
    names = ("tiny-qwen2.5", "tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next")
    return {name: save_tiny_hf(matrix.models[name], root / name, randomize) for name in names}


@pytest.fixture(scope="session")
def read_checkpoint():
    """(weight_map, tensors) of a sharded checkpoint directory, read through its index."""

    def read(directory):
        index = json.loads((directory / HF_INDEX).read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(index.values())):
            tensors.update(load_file(directory / shard))
        return index, tensors

    return read
