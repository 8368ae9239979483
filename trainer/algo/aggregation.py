"""Reduce a per-token loss ``(B, T)`` to the scalar a micro-batch backpropagates, split-independently.

Each micro-batch contributes ``sum(loss * mask) / D`` where ``D`` is a count over the GLOBAL batch: all
micro-batches of the step on all data-parallel ranks. Summing the contributions (gradient accumulation
sums, the DP reduction sums) then gives exactly the token mean of the whole batch, so the loss and its
gradient do not depend on how the batch is split into micro-batches or ranks. verl adopted this in
v0.7.0; before, it averaged per micro-batch, which weights a token of a short micro-batch more heavily.

The caller computes ``D`` once per step::

    local = sum(agg_denominator(mb.mask, mode) for mb in micro_batches)
    torch.distributed.all_reduce(local)            # SUM over DP ranks -> D
    for mb in micro_batches:
        agg_loss(per_token_loss(mb), mb.mask, D, mode).backward()

If the DP gradient reduction *averages* over ranks (DDP, FSDP), multiply each contribution by the DP
size so that the average of rank gradients equals their sum.

Modes (registered): ``"token-mean"`` (ChatLearn, the default: ``D`` = response tokens) and
``"seq-mean-token-mean"`` (verl option: each sequence's token mean, ``D`` = sequences with at least one
response token). Groups with A = 0 still count in ``D``, as in ChatLearn.

Masked positions (prompt, padding) are removed with ``torch.where``, not multiplied by 0: ``inf * 0`` is
nan, so a non-finite value computed at a position that does not count must not reach the sum.
"""

from __future__ import annotations

import torch

from trainer.algo.registry import Registry

AGG_MODES = Registry("loss aggregation mode")


def agg_denominator(mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """This micro-batch's share of the global denominator (float64 scalar); sum it over the global batch.

    ``mask``: ``(B, T)`` 1 for response tokens.
    """
    if mode not in AGG_MODES:
        AGG_MODES.get(mode)  # raises, listing the valid modes
    if mode == "seq-mean-token-mean":
        return (mask.sum(dim=-1) > 0).sum().to(torch.float64)
    return mask.sum().to(torch.float64)


def global_denominator(mode: str, *, tokens: float, sequences: float) -> float:
    """``D`` of ``mode`` from the global batch's response-token count and its count of sequences that hold
    at least one response token (the sums of :func:`agg_denominator` over the global batch)."""
    if mode not in AGG_MODES:
        AGG_MODES.get(mode)  # raises, listing the valid modes
    return sequences if mode == "seq-mean-token-mean" else tokens


def agg_loss(
    loss: torch.Tensor, mask: torch.Tensor, global_denominator: torch.Tensor | float, mode: str = "token-mean"
) -> torch.Tensor:
    """Scalar contribution of one micro-batch: ``AGG_MODES[mode](loss, mask) / global_denominator``.

    Args:
        loss: ``(B, T)`` per-token loss.
        mask: ``(B, T)`` 1 for response tokens, 0 elsewhere.
        global_denominator: the sum of :func:`agg_denominator` over all micro-batches and DP ranks.
    """
    if not isinstance(global_denominator, torch.Tensor) and global_denominator <= 0:
        # tensors are not checked: .item() would be a device sync on every micro-batch
        raise ValueError(
            f"global_denominator must be > 0 (no response tokens in the batch?), got {global_denominator}"
        )
    denom = torch.as_tensor(global_denominator, dtype=loss.dtype, device=loss.device)
    return AGG_MODES.get(mode)(loss, mask) / denom


@AGG_MODES.register("token-mean")
def _token_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Numerator of the global token mean: ``sum(loss over mask)``."""
    return _masked(loss, mask).sum()


@AGG_MODES.register("seq-mean-token-mean")
def _seq_token_mean_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Numerator of the global sequence mean: ``sum_b mean_t(loss[b] over mask[b])``."""
    tokens = mask.to(loss.dtype).sum(dim=-1).clamp(min=1)
    return (_masked(loss, mask).sum(dim=-1) / tokens).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over ``mask == 1`` (all entries when mask is None); 0 for an empty mask (a metric's mean)."""
    if mask is None:
        return x.float().mean()
    keep = mask.bool()
    return _masked(x, keep).sum() / keep.sum().clamp(min=1)


def _masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``loss`` where ``mask`` is set, exactly 0 elsewhere (even where ``loss`` is inf or nan)."""
    return torch.where(mask.bool(), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
