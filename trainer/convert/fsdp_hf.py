"""FSDP training checkpoint → Hugging Face safetensors (``fsdp-to-hf``), offline, one tensor at a time.

An FSDP2 checkpoint (``trainer: fsdp``) keeps the policy's model and optimizer as a torch distributed checkpoint
(DCP) in ``episode-N/policy/`` (``FSDPBackend.save``): every rank's dim-0 shards in ``__R_0.distcp`` files and a
``.metadata`` file with each tensor's whole shape and where its chunks lie. DCP's own reader assembles one whole
model tensor at a time from the chunks of all ranks, on one process (the optimizer state is never read), so only
the tensors of the output shard being written are in memory; the output takes ``--like``'s shard layout, side
files and dtypes.

``--groupgemm``: grouped-GEMM expert tensors (transformers' fused MoE layout, experts stacked on dim 0:
``mlp.experts.gate_up_proj`` (E, 2·I, H) and ``mlp.experts.down_proj`` (E, H, I)) are split into the
per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` that the released checkpoints use.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import Tensor
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from trainer.convert import ConvertError
from trainer.convert.shards import atomic_directory, copy_side_files, save_shard, write_index
from trainer.models.weight_files import HF_INDEX, shards_in_order, weight_map

GROUPED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
METADATA = ".metadata"  # DCP's index of a checkpoint directory


def policy_dir(path: Path) -> Path:
    """The policy's DCP directory of a run directory (its latest checkpoint), an episode directory, or itself."""
    latest = path / "checkpoints" / "latest"
    episode = path / "checkpoints" / latest.read_text().strip() if latest.is_file() else path
    for candidate in (episode / "policy", episode):
        if (candidate / METADATA).is_file():
            return candidate
    if any(episode.glob("rank-*.pt")):
        raise ConvertError(f"{episode}: not an FSDP checkpoint (no policy/{METADATA} of a torch distributed "
                           f"checkpoint); megatron-core runs convert with mcore-to-hf")
    raise ConvertError(f"{path}: no checkpoint here; pass a run directory, an episode directory "
                       f"(RUN/checkpoints/episode-N) or its policy/ directory")


class PolicyCheckpoint:
    """The model tensors of a policy's DCP directory: whole shapes from the metadata, each read on request."""

    def __init__(self, ckpt: Path):
        self.directory = policy_dir(ckpt)
        try:
            metadata = FileSystemReader(self.directory).read_metadata()
            paths = metadata.planner_data  # flattened DCP key → its path in the saved state dict
            self.shapes = {path[1]: (tuple(meta.size), meta.properties.dtype)
                           for key, meta in metadata.state_dict_metadata.items()
                           if isinstance(meta, TensorStorageMetadata) and (path := paths[key])[0] == "model"}
        except Exception as e:  # noqa: BLE001 (a torn or foreign file: one line, whatever torch raised)
            raise ConvertError(f"{self.directory / METADATA}: not a readable torch distributed checkpoint "
                               f"({type(e).__name__})") from None
        if not self.shapes:
            raise ConvertError(f"{self.directory}: holds no model tensors (not a trainer FSDP checkpoint)")

    def tensor(self, name: str) -> Tensor:
        """The whole tensor ``name``, assembled by DCP from every rank's chunks."""
        shape, dtype = self.shapes[name]
        whole = torch.empty(shape, dtype=dtype)
        try:
            with warnings.catch_warnings():  # DCP warns that there is no process group: offline is the point
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"model": {name: whole}}, storage_reader=FileSystemReader(self.directory), no_dist=True)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 (a missing or truncated shard file)
            raise ConvertError(f"{self.directory}: cannot read {name} ({type(e).__name__}); a .distcp file is "
                               f"missing or damaged") from None
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


def _tied(like: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(like), "tie_word_embeddings", False))


def fsdp_to_hf(ckpt: Path, out_dir: Path, like: Path, *, groupgemm: bool = False) -> Path:
    """Merge an FSDP checkpoint into ``out_dir`` with ``like``'s shards, files and dtypes; returns ``out_dir``."""
    policy = PolicyCheckpoint(ckpt)
    like_map = weight_map(like)
    shapes = dict(policy.shapes)
    if "lm_head.weight" not in like_map and _tied(like):
        shapes.pop("lm_head.weight", None)  # the model's state dict names the tied head too; HF saves it once
    produces = {n: hf_names(n, shape, groupgemm=groupgemm) for n, (shape, _) in shapes.items()}
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
                whole = policy.tensor(name)
                pieces = split_grouped(name, whole) if groupgemm else [(name, whole)]
                tensors |= {hf: t.to(dtypes[hf]) for hf, t in pieces if hf in wanted}
                del whole, pieces
            if tied and "lm_head.weight" in wanted:
                tensors["lm_head.weight"] = policy.tensor("model.embed_tokens.weight").to(dtypes["lm_head.weight"])
            total += save_shard(tmp / shard, tensors)
        if (like / HF_INDEX).exists():
            write_index(tmp / HF_INDEX, like_map, total)
    return out_dir
