"""Tensor shapes of a checkpoint against its config: read from the safetensors headers (no tensor data), checked
before anything is written, so a checkpoint whose tensors contradict its config.json is one line, not a broken
output that a run later loads into a traceback."""

from __future__ import annotations

from pathlib import Path

import torch

from matrix.schema import Model
from trainer.models.weight_files import WeightsError, open_safetensors


def expected_hf_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every tensor transformers builds for ``model`` (on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    from trainer.models.config import hf_config

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config(model))
    return {name: tuple(t.shape) for name, t in hf.state_dict().items()}


def expected_mcore_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Global megatron name → shape, from the HF shapes through the family's weight rules."""
    from trainer.models.weight_map import rules

    hf = expected_hf_shapes(model)
    return {
        rule.mcore: tuple(rule.to_mcore(*(torch.empty(hf[n], device="meta") for n in rule.hf)).shape)
        for rule in rules(model)
        if all(n in hf for n in rule.hf)
    }


def check_shapes(root: Path, mapping: dict[str, str], expected: dict[str, tuple[int, ...]]) -> None:
    """Every stored tensor named in ``expected`` has that shape; WeightsError naming the first that has not."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in mapping.items():
        if name in expected:
            by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        with open_safetensors(root / shard) as f:
            for name in sorted(names):
                stored = tuple(f.get_slice(name).get_shape())
                if stored != expected[name]:
                    raise WeightsError(
                        f"{root / shard}: tensor {name!r} has shape {list(stored)}, but config.json "
                        f"describes {list(expected[name])}; the weights and config.json are of "
                        "different models"
                    )
