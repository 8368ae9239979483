"""Group-relative advantages (GRPO) and group outcome ratios.

One prompt is sampled n times (a *group*); every sample's scalar reward is normalised within its group
and the result is broadcast to all of that sample's response tokens by the policy loss.

* ``"grpo"`` (ChatLearn, the parity target): ``A = (r - mean) / (std + 1e-5)`` with the population std
  (ddof 0). A singleton group has std 0, so ``A = 0``.
* ``"grpo_unbiased"`` (verl ``compute_grpo_outcome_advantage``): unbiased std (ddof 1), eps 1e-6, and a
  singleton group uses mean 0, std 1 (so ``A = r``), because ddof 1 is undefined for one sample.

Groups whose rewards are all equal get ``A = 0`` in both; they still count in the token denominator
(see ``aggregation.py``), as in ChatLearn. Source: DeepSeekMath (Shao et al. 2024), eq. for outcome
supervision; REFERENCE.md §4.
"""

from __future__ import annotations

import torch

from trainer.algo.registry import Registry

ADV_ESTIMATORS = Registry("advantage estimator")
register_adv_estimator = ADV_ESTIMATORS.register
get_adv_estimator = ADV_ESTIMATORS.get


def as_groups(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """View rewards as ``(n_groups, n)``.

    ``rewards`` is ``(n_groups * n,)`` (samples of one prompt contiguous; ``group_size`` required) or
    already ``(n_groups, n)`` (``group_size``, if given, must equal ``n``).
    """
    if rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"rewards have shape {tuple(rewards.shape)} but group_size={group_size}")
        return rewards
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (n_groups*n,) or (n_groups, n), got shape {tuple(rewards.shape)}")
    if group_size is None or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"1-D rewards of length {rewards.numel()} need a group_size >= 1 dividing it, got {group_size}"
        )
    return rewards.reshape(-1, group_size)


def _normalise(groups: torch.Tensor, ddof: int, eps: float, singleton_unit: bool) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` per row of ``groups`` ``(n_groups, n)``, in float32 or wider."""
    groups = groups.to(torch.promote_types(groups.dtype, torch.float32))
    mean = groups.mean(dim=1, keepdim=True)
    if groups.shape[1] == 1:
        std = torch.zeros_like(mean)
        if singleton_unit:  # verl: a lone sample keeps its raw reward as advantage
            mean, std = torch.zeros_like(mean), torch.ones_like(mean)
    else:
        std = groups.std(dim=1, correction=ddof, keepdim=True)
    return (groups - mean) / (std + eps)


@register_adv_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor, group_size: int | None = None, eps: float = 1e-5) -> torch.Tensor:
    """ChatLearn GRPO advantages: population std (ddof 0), ``eps`` 1e-5.

    Args:
        rewards: ``(n_groups * n,)`` or ``(n_groups, n)`` scalar rewards.
        group_size: ``n``; required for 1-D rewards.
    Returns:
        Advantages with the shape of ``rewards`` (float32 or wider), no gradient.
    """
    with torch.no_grad():
        groups = as_groups(rewards, group_size)
        return _normalise(groups, ddof=0, eps=eps, singleton_unit=False).reshape(rewards.shape)


@register_adv_estimator("grpo_unbiased")
def grpo_unbiased_advantages(
    rewards: torch.Tensor, group_size: int | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """verl GRPO advantages: unbiased std (ddof 1), ``eps`` 1e-6, singleton group -> mean 0, std 1.

    Shapes as in :func:`grpo_advantages`.
    """
    with torch.no_grad():
        groups = as_groups(rewards, group_size)
        return _normalise(groups, ddof=1, eps=eps, singleton_unit=True).reshape(rewards.shape)


def group_outcome_ratios(
    rewards: torch.Tensor, group_size: int | None = None, correct: float = 1.0
) -> dict[str, float]:
    """Share of groups where every sample is correct / every sample is wrong (ChatLearn metrics).

    A sample is correct when its reward ``>= correct``. Those groups have zero advantage and so carry no
    policy gradient; a rising all-correct ratio means the prompt set is getting too easy.

    Returns ``{"all_correct_ratio": float, "all_wrong_ratio": float}``.
    """
    groups = as_groups(rewards, group_size)
    ok = groups >= correct
    return {
        "all_correct_ratio": ok.all(dim=1).float().mean().item(),
        "all_wrong_ratio": (~ok).all(dim=1).float().mean().item(),
    }
