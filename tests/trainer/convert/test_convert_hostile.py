"""Checkpoints that are not what they claim: one line, exit 2, nothing written, before any progress output.
Tensors of other shapes than config.json's, broken safetensors headers, a config.json that is not a UTF-8 JSON
object, a file given where a directory goes; and a run's weights check catches the shapes too."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.convert.__main__ import main
from trainer.models import pretrained
from trainer.models.weight_files import HF_INDEX

TAMPERED = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, matrix, save_tiny_hf):
    return save_tiny_hf(matrix.models["tiny-qwen2.5"], tmp_path_factory.mktemp("hf") / "tiny-qwen2.5")


def _copy(hf_dir, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    return src, json.loads((src / HF_INDEX).read_text())["weight_map"]


def _one_wider_tensor(src, mapping):
    shard = src / mapping[TAMPERED]
    tensors = load_file(shard)
    rows, cols = tensors[TAMPERED].shape
    tensors[TAMPERED] = torch.zeros(rows + 8, cols)
    save_file(tensors, shard, metadata={"format": "pt"})
    return f"tensor '{TAMPERED}' has shape [{rows + 8}, {cols}], but config.json describes [{rows}, {cols}]"


def _truncated(src, mapping):
    shard = src / mapping[TAMPERED]
    shard.write_bytes(shard.read_bytes()[:200])
    return f"{shard}: not a readable safetensors file"


def _oversized_header(src, mapping):
    shard = src / mapping[TAMPERED]
    shard.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    return f"{shard}: not a readable safetensors file"


def _config_a_list(src, mapping):
    (src / "config.json").write_text("[1, 2]\n")
    return "config.json: a JSON list, where a JSON object {...} was expected"


def _config_not_utf8(src, mapping):
    (src / "config.json").write_bytes(b'{"model_type": "qwen2\xff"}\n')
    return "config.json: not UTF-8 (byte 21); JSON files are UTF-8"


def _file_as_directory(src, mapping):
    return None


@pytest.mark.parametrize(
    "damage",
    [_one_wider_tensor, _truncated, _oversized_header, _config_a_list, _config_not_utf8, _file_as_directory],
    ids=lambda f: f.__name__.strip("_"),
)
def test_hf_to_mcore_refuses_in_one_line_and_writes_nothing(hf_dir, tmp_path, capsys, damage):
    src, mapping = _copy(hf_dir, tmp_path)
    words = damage(src, mapping)
    if words is None:  # the config file itself given as the checkpoint directory
        src, words = src / "config.json", "a file, where a checkpoint directory was expected"
    assert main(["hf-to-mcore", str(src), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and words in captured.err, captured.err
    assert "hf-to-mcore" not in captured.err and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_runs_weights_check_catches_a_tensor_of_another_shape(hf_dir, tmp_path, matrix):
    src, mapping = _copy(hf_dir, tmp_path)
    words = _one_wider_tensor(src, mapping)
    model = matrix.models["tiny-qwen2.5"].model_copy(update={"weights": str(src)})
    with pytest.raises(pretrained.WeightsError, match="has shape") as caught:
        pretrained.check(model, "tiny-qwen2.5", matrix.layouts["single"], "single")
    assert words in str(caught.value) and "\n" not in str(caught.value)
