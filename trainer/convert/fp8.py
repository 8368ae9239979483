"""DeepSeek-V3's fp8 release → bf16: weight (e4m3) × its per-block ``weight_scale_inv``, shard by shard.

Each fp8 ``X.weight`` [rows, cols] has ``X.weight_scale_inv`` [⌈rows/B⌉, ⌈cols/B⌉] (B = 128, from
``quantization_config.weight_block_size``); the last block row / column is ragged when rows or cols are not
multiples of B. Output shards keep their names; scale tensors are dropped from shards and index. The cast is
resumable: each finished shard is renamed into place, a rerun skips shards already there, and the index
(written last) marks the directory complete. config.json is copied unchanged (the matrix's
``drop-config-key quantization_config`` step follows).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from trainer.convert import ConvertError
from trainer.convert.shards import copy_side_files, save_shard, write_index
from trainer.models.weight_files import (
    HF_INDEX,
    iter_shard,
    read_json,
    read_tensor,
    shards_in_order,
    weight_map,
)

SCALE = "_scale_inv"
FP8 = (torch.float8_e4m3fn,)


def dequantize(weight: Tensor, scale_inv: Tensor, block: int) -> Tensor:
    """bf16 weight = fp8 weight × the scale of the block each element lies in (ragged edge blocks)."""
    rows, cols = weight.shape
    expected = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} != {expected} for weight {tuple(weight.shape)}")
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scale).to(torch.bfloat16)


def block_size(config: dict, override: int | None) -> int:
    if override:
        return override
    sizes = (config.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    if len(set(sizes)) != 1:
        raise ConvertError(f"config.json field 'quantization_config.weight_block_size': {sizes} is not square")
    return int(sizes[0])


def fp8_to_bf16(in_dir: Path, out_dir: Path, *, block: int | None = None) -> Path:
    """Cast every fp8 weight of ``in_dir`` to bf16 into ``out_dir`` (resumable; see the module docstring)."""
    config = read_json(in_dir / "config.json")
    b = block_size(config, block)
    mapping = weight_map(in_dir)
    if (out_dir / HF_INDEX).exists():
        raise ConvertError(f"{out_dir}: already complete ({HF_INDEX} present); choose a new output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_map = {name: shard for name, shard in mapping.items() if not name.endswith(SCALE)}
    for shard in tqdm(shards_in_order(mapping), desc="fp8-to-bf16", unit="shard"):
        if (out_dir / shard).exists():
            continue  # finished in an earlier run
        tensors = {}
        for name, tensor in iter_shard(in_dir, shard):
            if name.endswith(SCALE):
                continue
            if tensor.dtype in FP8:
                scale_name = name + SCALE
                if scale_name not in mapping:
                    raise ConvertError(f"{in_dir}: fp8 tensor {name!r} has no {scale_name!r}")
                try:
                    tensor = dequantize(tensor, read_tensor(in_dir, mapping[scale_name], scale_name), b)
                except ValueError as e:
                    raise ConvertError(f"{in_dir}: {name}: {e}") from None
            tensors[name] = tensor
        save_shard(out_dir / shard, tensors)
    copy_side_files(in_dir, out_dir)

    total = sum(
        t.numel() * t.element_size() for s in shards_in_order(out_map) for _, t in iter_shard(out_dir, s)
    )
    write_index(out_dir / HF_INDEX, out_map, total)
    return out_dir
