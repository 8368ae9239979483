"""Per-token KL estimators between the policy and the frozen reference, registered by name.

All take ``logp`` and ``ref_logp`` of the sampled tokens, ``(B, T)``, and return ``(B, T)``; reduce with
``aggregation.agg_loss``. Estimators from J. Schulman, "Approximating KL Divergence" (2020); with
samples from the policy, ``d = ref_logp - logp``:

* ``"k1"``: ``-d`` (unbiased, high variance, can be negative);
* ``"k2"``: ``d**2 / 2`` (biased, low variance);
* ``"k3"``: ``exp(d) - d - 1`` (unbiased, always >= 0). ChatLearn and verl's ``low_var_kl`` use it,
  clamped to ``[-10, 10]``. ChatLearn logs it with coefficient 0; verl's default coefficient is 0.001.

k3 clamps the log-ratio ``d`` to ``[-20, 20]`` before ``exp``, as verl's ``low_var_kl`` does: fp32 ``exp``
overflows to inf above ~88.7, and an inf there makes the backward 0 * inf = nan even where the result is
clamped, masked or multiplied by a zero coefficient. The clamp changes no value the output clamp keeps
(``exp(20) - 21`` is far above 10, and ``d < -20`` gives ``-d - 1 > 10``).
"""

from __future__ import annotations

import torch

from trainer.algo.registry import Registry

KL_ESTIMATORS = Registry("kl estimator")
register_kl_estimator = KL_ESTIMATORS.register
get_kl_estimator = KL_ESTIMATORS.get

K3_CLAMP = 10.0  # ChatLearn / verl bound on k3, so one far-off-reference token cannot dominate the loss
LOG_RATIO_CLAMP = 20.0  # verl low_var_kl: exp(20) ~ 4.9e8 is finite in fp32 (and in bf16)


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
    """k3 = exp(d) - d - 1 with d = ref_logp - logp clamped to ±20, result clamped to ``[-clamp, clamp]``.

    ``(B, T)``; finite, with a finite gradient, for any finite inputs.
    """
    d = torch.clamp(ref_logp - logp, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    k3 = torch.exp(d) - d - 1
    return k3 if clamp is None else torch.clamp(k3, min=-clamp, max=clamp)
