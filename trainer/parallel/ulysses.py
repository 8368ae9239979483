"""Ulysses sequence parallelism for transformers models (FSDP2 backend).

The ``sp`` ranks of a Ulysses group each hold one slice of a packed sequence. Around attention an
all-to-all trades the sequence split for a head split: every rank gets the whole sequence for heads/sp of the
heads, attends, and a second all-to-all gives the sequence slices back. Everything else in the layer
(projections, norms, MLP, rope on the slice's own positions) is per token and needs no exchange.

It plugs into transformers as an attention implementation (``ATTENTION``). The causal mask of packed rows is
built from the positions of the whole packed sequence, which the backend declares with ``whole_sequence``
before the forward (a rank's slice alone cannot tell where a row that started on another rank begins).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_to_all_single

ATTENTION = "ulysses_sdpa"

_STATE: dict = {}


@contextlib.contextmanager
def whole_sequence(position_ids: Tensor, group) -> Iterator[None]:
    """Within the block, attention layers see ``position_ids`` (1, L) of the whole packed sequence."""
    _STATE.update(positions=position_ids, group=group)
    try:
        yield
    finally:
        _STATE.clear()


def packed_causal_mask(position_ids: Tensor) -> Tensor:
    """(1, 1, L, L) bool: causal, and only within the packed row (a row starts where positions do not step by 1)."""
    pos = position_ids[0]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    row = starts.cumsum(0)
    same = row[:, None] == row[None, :]
    return (same & torch.ones_like(same).tril())[None, None]


def _exchange(x: Tensor, group, *, split: int, gather: int) -> Tensor:
    """all-to-all: split dim ``split`` over the group's ranks, concatenate what arrives along ``gather``."""
    parts = dist.get_world_size(group)
    chunks = torch.stack(x.chunk(parts, dim=split))  # (parts, ...) in rank order
    received = all_to_all_single(torch.empty_like(chunks), chunks.contiguous(), group=group)
    return torch.cat(received.unbind(0), dim=gather)


def attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, **_kwargs) -> tuple[Tensor, None]:
    """transformers attention interface: q/k/v (B, heads, L/sp, d) → output (B, L/sp, heads, d)."""
    group = _STATE["group"]
    parts = dist.get_world_size(group)
    if key.shape[1] % parts:  # fewer KV heads than ranks: give every rank the KV heads its query heads use
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    q, k, v = (_exchange(t, group, split=1, gather=2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packed_causal_mask(_STATE["positions"]),
                                         dropout_p=dropout if module.training else 0.0, scale=scaling,
                                         enable_gqa=k.shape[1] != q.shape[1])
    out = _exchange(out, group, split=2, gather=1)  # (B, heads, L/sp, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``ATTENTION`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # its slice-local mask is unused: see the docstring
