"""Context parallelism: load-balanced causal sharding of sequences, and K/V gathered across the CP group.

Each sequence (padded to a multiple of 2·CP) is cut into 2·CP chunks of length c; CP rank i holds chunks i
and 2·CP−1−i (REFERENCE §7), so every rank gets the same causal work. megatron-core's rotary embedding
slices its positions the same way (``get_pos_emb_on_this_cp_rank``). Labels are taken from the FULL
sequence (token t+1) before sharding, and masks and per-token inputs are sharded with the same chunks, so
a token's label never depends on where a chunk ends. Per-token outputs are gathered back into sequence
order before any per-sequence math.

The core attention attends its local query chunks to keys/values all-gathered over the CP group (in
sequence order), with a causal mask built from the positions each chunk really holds. The gather is
differentiable: its backward all-reduces the key/value gradients and keeps this rank's part (gloo has no
reduce-scatter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import Tensor


def size() -> int:
    return parallel_state.get_context_parallel_world_size()


def rank() -> int:
    return parallel_state.get_context_parallel_rank()


def sequence_unit() -> int:
    """Sequences are padded to a multiple of this: 2·CP chunks (no padding without CP)."""
    return 2 * size() if size() > 1 else 1


def local_positions(seq_len: int, cp_size: int, cp_rank: int, device: torch.device | None = None) -> Tensor:
    """Positions (in the full sequence) held by ``cp_rank``: chunk i then chunk 2·CP−1−i, made on ``device``
    (default: the host) to index or mask tensors there."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2·CP = {2 * cp_size}")
    c = seq_len // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(first * c, (first + 1) * c, device=device),
                      torch.arange(second * c, (second + 1) * c, device=device)])


def chunk_boundaries(seq_len: int, cp_size: int) -> Tensor:
    """Positions on either side of every chunk boundary (where CP bugs show first)."""
    c = seq_len // (2 * cp_size)
    edges = torch.arange(1, 2 * cp_size) * c
    return torch.cat([edges - 1, edges]).sort().values


def pad_to_unit(t: Tensor, unit: int, value: float) -> Tensor:
    """Right-pad dim 1 of (B, T, ...) to a multiple of ``unit``."""
    extra = -t.shape[1] % unit
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, extra]
    return F.pad(t, pad, value=value)


def shard(t: Tensor) -> Tensor:
    """This rank's chunks of dim 1 of (B, T, ...), T a multiple of 2·CP."""
    if size() == 1:
        return t
    return t.index_select(1, local_positions(t.shape[1], size(), rank(), t.device))


def next_token_labels(input_ids: Tensor, pad_id: int = 0) -> Tensor:
    """labels[:, t] = input_ids[:, t+1], computed on the full sequence; the last position gets ``pad_id``."""
    return F.pad(input_ids[:, 1:], (0, 1), value=pad_id)


def shard_labels(input_ids: Tensor) -> Tensor:
    """Labels of this rank's tokens: shifted on the FULL sequence first, then sharded like the inputs."""
    return shard(next_token_labels(input_ids))


def unshard(local: Tensor) -> Tensor:
    """Gather (B, T/CP, ...) chunks from every CP rank back into (B, T, ...) in sequence order (no grad)."""
    n = size()
    if n == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_context_parallel_group())
    seq = local.shape[1] * n
    out = local.new_empty((local.shape[0], seq, *local.shape[2:]))
    for r, part in enumerate(parts):
        out[:, local_positions(seq, n, r, out.device)] = part
    return out


class _GatherSequence(torch.autograd.Function):
    """[s_local, ...] on each CP rank → [s_local·CP, ...] in rank order; backward: sum, keep own part."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        group = parallel_state.get_context_parallel_group()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.local = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        start = parallel_state.get_context_parallel_rank() * ctx.local
        return grad[start : start + ctx.local]


def causal_positions(local_len: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(query positions of this rank, key positions in gathered rank order), both in the full sequence."""
    n, r = size(), rank()
    seq = local_len * n
    keys = torch.cat([local_positions(seq, n, k, device) for k in range(n)])
    return local_positions(seq, n, r, device), keys


def gather_kv_causal(key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys/values [s_local, b, g, d] of every CP rank and the causal mask [s_local, s_local·CP] (True: attend)."""
    q_pos, k_pos = causal_positions(key.shape[0], key.device)
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    return _GatherSequence.apply(key), _GatherSequence.apply(value), mask
