"""The GRPO objective of one optimizer step, as the `loss_fn` a backend's `train_step` calls per micro-batch.

loss = token-mean over the GLOBAL batch of [pg + kl_coef·k3 − entropy_coef·entropy], so the loss and its
gradient do not depend on how the batch is split into micro-batches or data-parallel ranks (REFERENCE §4).
Metrics are returned pre-weighted by the micro-batch's share of tokens, so the backend's sum over
micro-batches is the global token mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from matrix.schema import GRPO
from trainer.algo import agg_loss, get_adv_estimator, get_policy_loss, kl_k3

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def advantages(grpo: GRPO, rewards: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages (B,) of rewards laid out as consecutive groups of `samples_per_prompt`."""
    estimator = get_adv_estimator("grpo" if grpo.std == "population" else "grpo_unbiased")
    return estimator(rewards, grpo.samples_per_prompt)


def make_loss_fn(grpo: GRPO, global_tokens: float) -> LossFn:
    """`global_tokens`: response tokens in the whole step (all micro-batches, all DP ranks)."""
    policy_loss = get_policy_loss("vanilla")  # ChatLearn's; dual_clip_c switches verl's bound on inside it

    def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, torch.Tensor]):
        mask = mb["response_mask"]
        pg, pg_metrics = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask, clip_low=grpo.clip_low,
                                     clip_high=grpo.clip_high, loss_cap=grpo.loss_cap, dual_clip_c=grpo.dual_clip_c)
        kl = kl_k3(logp, mb["ref_logprobs"])
        loss = agg_loss(pg + grpo.kl_coef * kl - grpo.entropy_coef * entropy, mask, global_tokens)
        share = mask.sum().item() / global_tokens
        metrics = {"loss/total": loss.item(),
                   "loss/pg": agg_loss(pg.detach(), mask, global_tokens).item(),
                   "loss/kl": agg_loss(kl.detach(), mask, global_tokens).item(),
                   "loss/entropy": agg_loss(entropy.detach(), mask, global_tokens).item()}
        metrics |= {k: v.item() * share for k, v in pg_metrics.items()}
        return loss, metrics

    return loss_fn


def sft_loss_fn(global_tokens: float) -> LossFn:
    """Cross-entropy on response tokens (the demo's warm start), same aggregation as GRPO."""

    def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, torch.Tensor]):
        loss = agg_loss(-logp, mb["response_mask"], global_tokens)
        return loss, {"loss/sft": loss.item()}

    return loss_fn
