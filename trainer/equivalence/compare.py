"""Compare a candidate layout's replay record with the reference's, quantity by quantity.

Quantities (max over the gate's steps): per-token log-probs over response tokens (max abs), the same at the
positions next to CP chunk boundaries (where label and causal-offset bugs show first; candidates with
CP > 1), the loss and the grad norm (relative), and the weights after the last step (max abs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matrix.schema import Tolerances


@dataclass(frozen=True)
class Measured:
    quantity: str
    value: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance  # NaN fails


def _worst(a: float, b: float) -> float:
    """max() that keeps NaN (a NaN difference must fail the gate, and max(0.0, nan) is 0.0)."""
    return b if b != b or b > a else a


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def boundary_positions(width: int, cp: int) -> torch.Tensor:
    """Log-prob positions (position t scores token t+1) that score a token next to a 2·CP chunk boundary of
    a row padded to 2·CP (``trainer.parallel.cp.chunk_boundaries``): those tokens and the ones before them."""
    from trainer.parallel.cp import chunk_boundaries  # megatron-heavy import, only for CP candidates

    unit = 2 * cp
    tokens = chunk_boundaries(-(-width // unit) * unit, cp)
    return torch.cat([tokens - 1, tokens]).clamp(0, width - 2).unique()


def compare(reference: dict, candidate: dict, mask: torch.Tensor, tolerances: Tolerances, *, cp: int,
            quantities: list[str]) -> list[Measured]:
    """Measured differences of ``candidate`` against ``reference`` (records of ``replay_rank``)."""
    real = mask.bool()
    logp = boundary = loss = grad = 0.0
    for ref, cand in zip(reference["steps"], candidate["steps"], strict=True):
        diff = (ref["logprobs"] - cand["logprobs"]).abs()
        logp = _worst(logp, float(diff[real].max()))
        if cp > 1:
            at = boundary_positions(diff.shape[1] + 1, cp)
            boundary = _worst(boundary, float(diff[:, at][real[:, at]].max()))
        loss = _worst(loss, _rel(cand["loss"], ref["loss"]))
        grad = _worst(grad, _rel(cand["grad_norm"], ref["grad_norm"]))
    out = []
    if "logprobs" in quantities:
        out.append(Measured("logprobs max abs", logp, tolerances.logprobs_max_abs))
        if cp > 1:
            out.append(Measured("logprobs at CP chunk boundaries, max abs", boundary, tolerances.logprobs_max_abs))
    if "loss" in quantities:
        out.append(Measured("loss rel", loss, tolerances.loss_rel))
    if "grad_norm" in quantities:
        out.append(Measured("grad norm rel", grad, tolerances.grad_norm_rel))
    if "weights" in quantities:
        missing = set(reference["weights"]) ^ set(candidate["weights"])
        worst = float("inf") if missing else 0.0
        for k in [] if missing else reference["weights"]:
            worst = _worst(worst, float((reference["weights"][k] - candidate["weights"][k]).abs().max()))
        out.append(Measured("weights after last step, max abs", worst, tolerances.weights_max_abs))
    return out
