"""Tiny HF checkpoints saved sharded (with model.safetensors.index.json), as the hub ships large models."""

import json

import pytest
from safetensors.torch import load_file

from trainer.models.weight_files import HF_INDEX


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, matrix, save_tiny_hf):
    root = tmp_path_factory.mktemp("hf")
    names = ("tiny-qwen2.5", "tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next")
    return {name: save_tiny_hf(matrix.models[name], root / name) for name in names}


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
