"""Per-token clipped policy-gradient losses, registered by name.

Every loss has the signature ``fn(logp, old_logp, advantages, mask, **options) -> (loss, metrics)``:

* ``logp``: ``(B, T)`` log-probs of the sampled tokens under the current policy (carries the gradient).
* ``old_logp``: ``(B, T)`` log-probs under the policy that sampled, recomputed by the trainer.
* ``advantages``: ``(B,)`` per sample (broadcast over tokens) or ``(B, T)`` per token.
* ``mask``: ``(B, T)`` 1 for response tokens, 0 for prompt/padding; used only for the metrics.
* ``loss``: ``(B, T)`` un-aggregated per-token loss; reduce it with ``aggregation.agg_loss``.
* ``metrics``: detached scalars averaged over this micro-batch's masked tokens, keys ``actor/...``.

``"vanilla"`` is ChatLearn's loss (REFERENCE.md §4): PPO clip (Schulman et al. 2017) with separate low /
high ranges (DAPO's clip-higher), then the per-token loss capped at a constant 3.0. ``"dual_clip"`` is
verl's: for A < 0 the loss is bounded by ``-A * c`` (Ye et al. 2020, "Mastering Complex Control in MOBA
Games with Deep RL"), and no constant cap.
"""

from __future__ import annotations

import torch

from trainer.algo.aggregation import masked_mean
from trainer.algo.registry import Registry

POLICY_LOSSES = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get

DUAL_CLIP_C = 3.0  # verl's clip_ratio_c
LOG_RATIO_MAX = 10.0  # exp(10) ~ 2.2e4: a stale or broken old_logp cannot overflow the ratio to inf


@register_policy_loss("vanilla")
def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_cap: float | None = 3.0,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip per-token loss with ChatLearn's constant cap and optional verl dual clip.

    ``ratio = exp(min(logp - old_logp, 10))``;
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``;
    if ``dual_clip_c``: ``pg = min(pg, -A * c)`` where ``A < 0``;
    if ``loss_cap``: ``pg = min(pg, loss_cap)`` (capped tokens get zero gradient, like ChatLearn).

    Shapes: see the module docstring. Returns ``(loss (B, T), metrics)``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B,) -> (B, 1), broadcast over tokens
    log_ratio = logp - old_logp
    ratio = torch.exp(torch.clamp(log_ratio, max=LOG_RATIO_MAX))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)

    metrics = {
        "actor/pg_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask).detach(),
        "actor/ppo_kl": masked_mean(-log_ratio, mask).detach(),  # k1 estimate of KL(old || new)
    }
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1.0, got {dual_clip_c}")
        bound = -advantages * dual_clip_c
        lower_hit = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        metrics["actor/pg_clipfrac_lower"] = masked_mean(lower_hit.float(), mask).detach()
    if loss_cap is not None:
        metrics["actor/pg_capfrac"] = masked_mean((loss > loss_cap).float(), mask).detach()
        loss = torch.clamp(loss, max=loss_cap)
    return loss, metrics


@register_policy_loss("dual_clip")
def dual_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """verl's dual-clip PPO loss (``clip_ratio_c``, None → 3.0; no constant cap); shapes as in the module doc."""
    return ppo_clip_loss(
        logp,
        old_logp,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        loss_cap=None,
        dual_clip_c=DUAL_CLIP_C if dual_clip_c is None else dual_clip_c,
    )
