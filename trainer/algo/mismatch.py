"""Rollout–trainer mismatch: how far the engine's sampling log-probs are from the trainer's, token by token.

The most common silent cause of RL divergence with vLLM / SGLang is an engine that does not compute the
distribution the trainer thinks it sampled from (stale weights, a kernel difference, bf16 vs fp32). These
are the metrics in use for it (REFERENCE §8), as pure functions over ``(B, T)`` tensors and a response mask:

* ``mismatch/logprob_abs_diff_mean`` and ``_max``: |Δ| with Δ = trainer − engine log-prob (slime's CI
  asserts the mean ≤ 0.1);
* ``mismatch/token_mult_prob_error``: mean of exp|Δ| (NeMo-RL; > 1.05 is treated as a framework bug);
* ``mismatch/kl``: mean of r − log r − 1 with r = exp(Δ) = p_trainer / p_engine (prime-rl's mismatch KL,
  the k3 estimator of KL(engine ‖ trainer) on the engine's samples);
* ``mismatch/prob_pearson``: Pearson correlation of the two token probabilities (verl); NaN when either side
  is constant.

Compare like with like: the trainer's log-probs are the raw model distribution (no temperature, top-k or
top-p), so the engine's must be raw too. The torch engine, vLLM 0.8.5's V1 engine and SGLang 0.5.2 (its adapter sets
``RETURN_ORIGINAL_LOGPROB``) return raw log-probs; vLLM's V0 engine (the CPU build's) returns processed ones, which
bias every metric here unless sampling is unfiltered (``trainer.rollout.factory.logprob_problem`` refuses that case).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.algo.aggregation import masked_mean


def scatter_responses(response_mask: Tensor, per_sequence: Sequence[Sequence[float]]) -> Tensor:
    """Per-sequence values (the engine's log-probs of each response) laid out like ``response_mask`` (B, T).

    Row i's values fill the masked positions of row i in order; their count must match the mask's.
    """
    out = torch.zeros_like(response_mask, dtype=torch.float32)
    for i, values in enumerate(per_sequence):
        where = response_mask[i].nonzero().squeeze(-1)
        if len(where) != len(values):
            raise ValueError(f"sequence {i}: {len(values)} values for {len(where)} response positions")
        out[i, where] = torch.as_tensor(values, dtype=torch.float32)
    return out


def mismatch_metrics(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """The metrics of the module docstring over the tokens where ``mask`` is 1; tensors (B, T)."""
    keep = mask.bool()
    trainer, engine = trainer_logprobs.detach().double()[keep], engine_logprobs.detach().double()[keep]
    if trainer.numel() == 0:
        raise ValueError("the mask selects no token")
    delta = trainer - engine
    ratio = torch.exp(delta)
    p_trainer, p_engine = torch.exp(trainer), torch.exp(engine)
    centred_t, centred_e = p_trainer - p_trainer.mean(), p_engine - p_engine.mean()
    denominator = torch.sqrt((centred_t**2).sum() * (centred_e**2).sum())
    pearson = (centred_t * centred_e).sum() / denominator if denominator > 0 else torch.tensor(float("nan"))
    return {
        "mismatch/logprob_abs_diff_mean": delta.abs().mean().item(),
        "mismatch/logprob_abs_diff_max": delta.abs().max().item(),
        "mismatch/token_mult_prob_error": torch.exp(delta.abs()).mean().item(),
        "mismatch/kl": (ratio - delta - 1).mean().item(),
        "mismatch/prob_pearson": pearson.item(),
    }


def truncated_is_weights(old_logprobs: Tensor, engine_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights min(p_trainer / p_engine, cap), detached, (B, T).

    Multiplying the per-token policy loss by them corrects for sampling from the engine's distribution
    instead of the trainer's old policy (Yao et al., "Your efficient RL framework secretly brings you
    off-policy RL training", 2025; verl's ``tis_imp_ratio_cap``); the cap bounds the variance. The
    objective applies them when ``grpo.tis_cap`` is set (off by default); masked positions are the caller's
    to ignore.
    """
    if cap <= 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    return torch.exp(old_logprobs.detach() - engine_logprobs.detach()).clamp(max=cap)


def truncated_is_metrics(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float) -> dict[str, Tensor]:
    """Over the tokens where ``mask`` is 1: ``tis/weight_mean``, the mean weight of :func:`truncated_is_weights`,
    and ``tis/clipped_fraction``, the share of tokens whose ratio exceeds ``cap`` (a ratio of exactly the cap,
    e.g. 1 with cap 1 where both sides agree, changes nothing and is not counted)."""
    ratio = torch.exp(old_logprobs.detach().double() - engine_logprobs.detach().double())  # 1e-7 shows
    return {"tis/weight_mean": masked_mean(ratio.clamp(max=cap), mask),
            "tis/clipped_fraction": masked_mean((ratio > cap).float(), mask)}
