"""Whole tensors under global megatron names from TP/PP/EP shards, and the inverse (a rank's shard of them).

Weight sync and HF checkpoints speak whole tensors (``weight_map`` turns them into HF names), so the rollout
engine receives exactly what a one-process run would send. What a shard is comes from megatron's own
parameter attributes, never from a family table:
- TP: ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` (stride 2: fused [gate; up] of a
  SwiGLU fc1, where each rank holds [gate_r; up_r]); expert weights shard over the expert-TP group. A module
  whose fused tensor has unequal sections (a family's own marking) sets ``partition_sections``, the whole
  sizes along ``partition_dim``: each rank holds its slice of every section, in order.
- PP: each stage numbers its layers from 0; the global index adds megatron's layer offset.
- EP: each EP rank numbers its local experts from 0; the global index adds ep_rank · local experts.
- The vocabulary is padded to a multiple of TP (``tp.padded_vocab``); whole tensors carry the real rows.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import Tensor

from trainer.platform import HOST

VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


def _is_expert(p: Tensor) -> bool:
    return not getattr(p, "allreduce", True)


def _tp_group(p: Tensor):
    """The group a parameter is TP-sharded over: its layer's own ``tp_group`` when the layer has one (a shared
    expert may use the expert-TP group), else megatron's TP or expert-TP group."""
    group = getattr(p, "_grpo_tp_group", None)
    if group is not None:
        return group
    return ps.get_expert_tensor_parallel_group() if _is_expert(p) else ps.get_tensor_model_parallel_group()


def mark_tp_groups(model: torch.nn.Module) -> None:
    """Each parameter's TP group (``_tp_group``), and the stride TE leaves out: a grouped expert's SwiGLU fc1
    holds [gate_r; up_r] on each expert-TP rank as SequentialMLP's does (megatron's ``TEGroupedMLP.
    sharded_state_dict`` reads it so), but TE marks it stride 1."""
    for module in model.modules():
        group = getattr(module, "tp_group", None)
        if group is not None:
            for p in module.parameters(recurse=False):
                p._grpo_tp_group = group
    if getattr(model.config, "gated_linear_unit", False):
        for name, p in model.named_parameters():
            match = _GROUPED_EXPERT.search(name)
            if match and match.group(1) == "linear_fc1" and getattr(p, "tensor_model_parallel", False):
                p.partition_stride = 2


def canonical_name(local: str) -> str:
    """A parameter's name with expert weights named as megatron's ``SequentialMLP`` names them, whichever module
    holds them: Transformer Engine's grouped-GEMM experts (``TEGroupedMLP``, the CUDA platform's choice with TE)
    name local expert e's fc1 ``experts.linear_fc1.weight{e}``, SequentialMLP ``experts.local_experts.{e}.
    linear_fc1.weight``. Each is one [out, in] tensor laid out alike ([gate; up] rows for fc1), so the weight
    maps, the sharded weight files and the EP renumbering below know one name. (GPU) not verified here: TE
    does not install on CPU; the names are those of TE's ``GroupedLinear`` and megatron's ``TEGroupedLinear``."""
    return _GROUPED_EXPERT.sub(lambda m: f".experts.local_experts.{m.group(3)}.{m.group(1)}.{m.group(2)}", local)


def global_name(local: str, model: torch.nn.Module) -> str:
    """A stage-local / EP-local parameter name → its name in the whole model."""
    offset = get_transformer_layer_offset(model.config)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", canonical_name(local))
    experts = getattr(model.config, "num_moe_experts", None)
    if experts and _EXPERT.search(name):
        per_rank = experts // ps.get_expert_model_parallel_world_size()
        first = ps.get_expert_model_parallel_rank() * per_rank
        name = _EXPERT.sub(lambda m: f".experts.local_experts.{int(m.group(1)) + first}.", name)
    return name


def _unshard_tp(p: Tensor) -> Tensor:
    group = _tp_group(p)
    n = dist.get_world_size(group)
    if n == 1 or not getattr(p, "tensor_model_parallel", False):
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(n)]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    dim, local = p.partition_dim, _local_sections(p, n)
    pieces = [part.split(local, dim=dim) for part in parts]  # each rank: [section_0 slice; section_1 slice; ...]
    return torch.cat([torch.cat([pc[s] for pc in pieces], dim=dim) for s in range(len(local))], dim=dim)


def _local_sections(p: Tensor, n: int) -> list[int]:
    """Sizes of this rank's slices of each section of ``p`` along its partition dim (equal ones for a stride)."""
    sections = getattr(p, "partition_sections", None)
    if sections is not None:
        return [size // n for size in sections]
    stride = getattr(p, "partition_stride", 1)
    return [p.shape[p.partition_dim] // stride] * stride


def shard_tp(full: Tensor, p: Tensor) -> Tensor:
    """This rank's TP shard of the whole tensor ``full`` of parameter ``p`` (inverse of the gather)."""
    group = _tp_group(p)
    n = dist.get_world_size(group)
    if n == 1 or not getattr(p, "tensor_model_parallel", False):
        return full
    r, dim, local = dist.get_rank(group), p.partition_dim, _local_sections(p, n)
    whole = full.split([size * n for size in local], dim=dim)
    return torch.cat([piece.chunk(n, dim=dim)[r] for piece in whole], dim=dim)


def _owns(p: Tensor) -> bool:
    """One rank per distinct whole tensor sends it: TP/ETP rank 0 of the first data-parallel replica."""
    if _is_expert(p):
        return ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The buffers a state dict holds (a router's expert bias; not its per-step token counts)."""
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer


def _owned_whole_tensors(model: torch.nn.Module, vocab: int) -> dict[str, Tensor]:
    """This rank's share of the whole tensors: every parameter (TP shards gathered inside each TP group, a
    collective every rank takes part in) and persistent buffer it owns (``_owns``), under global names, copied
    to host memory (apart from the live weights; a pickled or sent device tensor would hold a second model on
    the device, or come back on its sender's device)."""
    mark_tp_groups(model)
    mine: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        whole = _unshard_tp(p)
        if _owns(p) and not getattr(p, "shared", False):
            key = global_name(name, model)
            part = whole[:vocab] if key in VOCAB_PARAMS else whole
            mine[key] = part.to(HOST, copy=True).contiguous()
    for name, buffer in persistent_buffers(model):
        if _owns(buffer):
            mine[global_name(name, model)] = buffer.to(HOST, copy=True).contiguous()
    return mine


def stream_whole_tensors(model: torch.nn.Module, vocab: int, *, dst: int = 0) -> Iterator[tuple[str, Tensor]]:
    """Every parameter, and every persistent buffer (replicated over TP and DP: a router's expert bias, which
    training may move), as (global name, whole tensor in host memory) on global rank ``dst``, one at a time;
    nothing elsewhere. Every rank must exhaust the iterator (its tensors are sent as it goes).

    Each owner first holds its own share (``_owned_whole_tensors``, now: 1/(PP·EP) of the model, on every node at
    once, the TP gathers done before the caller goes on); then ``dst`` takes the owners' tensors one by one, in
    rank order, each sent by its owner when ``dst`` asks for it. So ``dst`` never holds more than its own share
    and the tensor in hand, where gathering every share there at once would need the whole model (DeepSeek-V3 in
    bf16: 1.3 TB) in one host's memory.
    """
    mine = _owned_whole_tensors(model, vocab)
    world = dist.get_world_size()
    if world == 1:
        return _handed_out(mine)
    tables: list | None = [None] * world if dist.get_rank() == dst else None
    dist.gather_object([(key, t.shape, t.dtype) for key, t in mine.items()], tables, dst=dst)
    if dist.get_rank() != dst:
        return _sent(mine, dst)
    return _received(mine, tables, dst)


def _handed_out(mine: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    for key in list(mine):
        yield key, mine.pop(key)


def _sent(mine: dict[str, Tensor], dst: int) -> Iterator[tuple[str, Tensor]]:
    for key in list(mine):
        dist.send(mine.pop(key), dst=dst)
    yield from ()


def _received(mine: dict[str, Tensor], tables: list, dst: int) -> Iterator[tuple[str, Tensor]]:
    for owner, table in enumerate(tables):
        for key, shape, dtype in table:
            if owner == dst:
                tensor = mine.pop(key)
            else:
                tensor = torch.empty(shape, dtype=dtype, device=HOST)
                dist.recv(tensor, src=owner)
            yield key, tensor
            del tensor  # the consumer's reference is the only one left


def whole_tensors(model: torch.nn.Module, vocab: int, *, dst: int = 0) -> dict[str, Tensor]:
    """``stream_whole_tensors`` collected into one dict on ``dst`` ({} elsewhere): a tiny model's worth, or a
    checkpoint that must be whole. Collective."""
    return dict(stream_whole_tensors(model, vocab, dst=dst))


def local_tensors(model: torch.nn.Module, whole: dict[str, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """(parameter, its shard of ``whole``) for every parameter of this rank's model; padding rows are zero."""
    mark_tp_groups(model)
    for name, p in model.named_parameters():
        key = whole_name(name, p, model, whole)
        if key not in whole:
            raise KeyError(f"no whole tensor for parameter {key!r} (local name {name!r})")
        yield p, local_shard(whole[key], key, p)


def local_tensors_and_buffers(model: torch.nn.Module, whole: Mapping[str, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """``local_tensors``, then (buffer, its whole value) for each buffer ``whole`` has (a router's expert bias)."""
    yield from local_tensors(model, whole)
    for name, b in model.named_buffers():
        key = global_name(name, model)
        if key in whole:
            yield b, whole[key]


def whole_name(local: str, p: Tensor, model: torch.nn.Module, known: Container[str]) -> str:
    """The global name of the whole tensor that parameter ``local`` is a shard of: ``global_name``, except the
    last stage's copy of a tied input embedding (not in ``known``), which is the embedding."""
    key = global_name(local, model)
    if key not in known and getattr(p, "shared_embedding", False):
        key = VOCAB_PARAMS[0]
    return key


def local_shard(full: Tensor, key: str, p: Tensor) -> Tensor:
    """This rank's piece of the whole tensor ``full`` (global name ``key``) for parameter or buffer ``p``:
    vocabulary rows zero-padded as the model pads them, then its TP shard. ``mark_tp_groups(model)`` first."""
    if key in VOCAB_PARAMS:
        rows = _padded_rows(p)
        full = torch.cat([full, full.new_zeros((rows - full.shape[0], *full.shape[1:]))]) if rows > full.shape[0] else full
    return shard_tp(full, p)


def _padded_rows(p: Tensor) -> int:
    n = dist.get_world_size(_tp_group(p)) if getattr(p, "tensor_model_parallel", False) else 1
    return p.shape[0] * n
