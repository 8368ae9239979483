"""Per-token KL estimators between the policy and the frozen reference, registered by name.

All take ``logp`` and ``ref_logp`` of the sampled tokens, ``(B, T)``, and return ``(B, T)``; reduce with
``aggregation.agg_loss``. Estimators from J. Schulman, "Approximating KL Divergence" (2020); with
samples from the policy, ``d = ref_logp - logp``:

* ``"k1"``: ``-d`` (unbiased, high variance, can be negative);
* ``"k2"``: ``d**2 / 2`` (biased, low variance);
* ``"k3"``: ``exp(d) - d - 1`` (unbiased, always >= 0). ChatLearn and verl's ``low_var_kl`` use it,
  clamped to ``[-10, 10]``. ChatLearn logs it with coefficient 0; verl's default coefficient is 0.001.
"""

from __future__ import annotations

import torch

from trainer.algo.registry import Registry

KL_ESTIMATORS = Registry("kl estimator")
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get

K3_CLAMP = 10.0  # ChatLearn / verl bound on k3, so one far-off-reference token cannot dominate the loss


@register_kl_estimator("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp, ``(B, T)``."""
    return logp - ref_logp


@register_kl_estimator("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (logp - ref_logp)**2 / 2, ``(B, T)``."""
    return 0.5 * (logp - ref_logp).square()


@register_kl_estimator("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None = K3_CLAMP) -> torch.Tensor:
    """k3 = exp(d) - d - 1 with d = ref_logp - logp, clamped to ``[-clamp, clamp]``; ``(B, T)``."""
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1
    return k3 if clamp is None else torch.clamp(k3, min=-clamp, max=clamp)
