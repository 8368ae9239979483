"""Per-token entropy of the policy's next-token distribution, computed from logits.

``H = logsumexp(z) - sum(softmax(z) * z)`` is exact and stable: no ``log(softmax)`` of tiny
probabilities, and ``-inf`` logits (a masked vocabulary) contribute 0, not nan. Rows are processed
``chunk_size`` at a time so the ``(rows, V)`` float32 temporaries of a 150k-token vocabulary need not
exist for the whole batch at once.
"""

from __future__ import annotations

import torch


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy per position.

    Args:
        logits: ``(..., V)``, e.g. ``(B, T, V)``; any float dtype (computed in float32 or wider).
        chunk_size: positions (rows of the flattened ``(B*T, V)`` view) per chunk; None = all at once.
    Returns:
        ``(...)``, e.g. ``(B, T)``, in float32 (or float64 for float64 logits). Differentiable.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    dtype = torch.promote_types(flat.dtype, torch.float32)
    step = chunk_size or max(flat.shape[0], 1)
    out = [flat.new_zeros(0, dtype=dtype)]
    for start in range(0, flat.shape[0], step):
        z = flat[start : start + step].to(dtype)
        # -inf (masked vocabulary) -> most negative finite, so p * z is 0 * finite, not 0 * -inf = nan
        z = z.clamp(min=torch.finfo(dtype).min)
        # shift by the row max: H is shift-invariant, and lse(z) - sum(p z) of two ~1e4 numbers would lose
        # the digits of an O(1) entropy to cancellation
        z = z - z.max(dim=-1, keepdim=True).values.detach()
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.cat(out).reshape(logits.shape[:-1])
