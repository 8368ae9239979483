"""FSDP training checkpoint → Hugging Face safetensors (``fsdp-to-hf``), offline, one output shard at a time.

An FSDP2 checkpoint (``trainer: fsdp``) is one file per rank, each holding that rank's dim-0 chunk of every
parameter under its HF name plus the whole shapes (``FSDPBackend.state_dict``). Concatenating the ranks'
chunks in rank order gives the whole tensor. Rank files are memory-mapped, so only the tensors of the output
shard being written are in memory; the output takes ``--like``'s shard layout, side files and dtypes.

``--groupgemm``: grouped-GEMM expert tensors (transformers' fused MoE layout, experts stacked on dim 0:
``mlp.experts.gate_up_proj`` (E, 2·I, H) and ``mlp.experts.down_proj`` (E, H, I)) are split into the
per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` that the released checkpoints use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from trainer.convert import ConvertError
from trainer.convert.shards import (
    HF_INDEX,
    atomic_directory,
    copy_side_files,
    save_shard,
    shards_in_order,
    weight_map,
    write_index,
)

GROUPED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def _episode_dir(path: Path) -> Path:
    """An episode directory with rank files, or a run directory (its latest checkpoint)."""
    if any(path.glob("rank-*.pt")):
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip()
    raise ConvertError(f"{path}: no rank-*.pt files and no checkpoints/latest; pass an episode directory "
                       f"(RUN/checkpoints/episode-N) or a run directory")


def read_rank_states(ckpt: Path) -> list[dict]:
    """Each rank's policy state (memory-mapped), checked to be an FSDP checkpoint of ranks 0..N-1."""
    directory = _episode_dir(ckpt)
    files = sorted(directory.glob("rank-*.pt"))
    expected = [f"rank-{r:05d}.pt" for r in range(len(files))]
    if [f.name for f in files] != expected:
        raise ConvertError(f"{directory}: rank files {[f.name for f in files]} are not rank-00000.pt … in order")
    states = []
    for f in files:
        try:
            policy = torch.load(f, map_location="cpu", mmap=True, weights_only=False)["policy"]
        except Exception as e:  # noqa: BLE001 (a torn or foreign file: one line, whatever torch raised)
            raise ConvertError(f"{f}: not a readable trainer checkpoint ({type(e).__name__})") from None
        if "shapes" not in policy:
            raise ConvertError(f"{f}: not an FSDP checkpoint (no shard shapes); megatron-core runs convert with "
                               f"mcore-to-hf")
        states.append(policy)
    return states


def merged(states: list[dict], name: str) -> Tensor:
    """The whole tensor ``name`` from every rank's dim-0 chunk."""
    chunks = [s["model"][name] for s in states]
    whole = torch.cat(chunks, dim=0) if chunks[0].ndim else chunks[0]
    shape = tuple(states[0]["shapes"][name])
    if tuple(whole.shape) != shape:
        raise ConvertError(f"{name}: rank chunks give shape {tuple(whole.shape)}, the checkpoint says {shape}; "
                           f"a rank file is missing or from another run")
    return whole


def _expert_names(prefix: str, kind: str, experts: int) -> list[str]:
    parts = ("down_proj",) if kind == "down_proj" else ("gate_proj", "up_proj")
    return [f"{prefix}.{e}.{part}.weight" for e in range(experts) for part in parts]


def hf_names(name: str, shape: tuple[int, ...], *, groupgemm: bool) -> list[str]:
    """The HF names a checkpoint tensor becomes (several for a grouped expert tensor under ``groupgemm``)."""
    found = GROUPED.match(name) if groupgemm else None
    return _expert_names(found["prefix"], found["kind"], shape[0]) if found else [name]


def split_grouped(name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Per-expert HF tensors of a grouped-GEMM expert tensor (in ``_expert_names`` order); others pass through."""
    found = GROUPED.match(name)
    if not found:
        yield name, tensor
        return
    pieces = [p for expert in tensor.unbind(0)
              for p in ((expert,) if found["kind"] == "down_proj" else expert.chunk(2, dim=0))]
    yield from zip(_expert_names(found["prefix"], found["kind"], tensor.shape[0]), pieces, strict=True)


def _dtypes(like: Path, mapping: dict[str, str]) -> dict[str, torch.dtype]:
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    for shard in shards_in_order(mapping):
        with safe_open(like / shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[name] = names.get(f.get_slice(name).get_dtype(), torch.float32)
    return out


def fsdp_to_hf(ckpt: Path, out_dir: Path, like: Path, *, groupgemm: bool = False) -> Path:
    """Merge an FSDP checkpoint into ``out_dir`` with ``like``'s shards, files and dtypes; returns ``out_dir``."""
    states = read_rank_states(ckpt)
    like_map = weight_map(like)
    shapes = states[0]["shapes"]
    produces = {n: hf_names(n, tuple(shape), groupgemm=groupgemm) for n, shape in shapes.items()}
    made = {hf for hfs in produces.values() for hf in hfs}
    tied = "lm_head.weight" in like_map and "lm_head.weight" not in made and "model.embed_tokens.weight" in made
    unknown = sorted(made - set(like_map))
    if unknown:
        raise ConvertError(f"{unknown[0]} of the checkpoint is not in {like} (another model, or use --groupgemm "
                           f"for grouped expert tensors)")
    missing = sorted(set(like_map) - made - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ConvertError(f"{like} has {missing[0]}, which the checkpoint lacks (another model?)")
    dtypes = _dtypes(like, like_map)
    with atomic_directory(out_dir) as tmp:
        copy_side_files(like, tmp)
        total = 0
        for shard in tqdm(shards_in_order(like_map), desc="fsdp-to-hf", unit="shard"):
            wanted = {n for n, s in like_map.items() if s == shard}
            tensors: dict[str, Tensor] = {}
            for name in [n for n, hfs in produces.items() if wanted & set(hfs)]:
                pieces = split_grouped(name, merged(states, name)) if groupgemm else [(name, merged(states, name))]
                tensors |= {hf: t.to(dtypes[hf]) for hf, t in pieces if hf in wanted}
            if tied and "lm_head.weight" in wanted:
                tensors["lm_head.weight"] = merged(states, "model.embed_tokens.weight").to(dtypes["lm_head.weight"])
            total += save_shard(tmp / shard, tensors)
        if (like / HF_INDEX).exists():
            write_index(tmp / HF_INDEX, like_map, total)
    return out_dir
