"""The GRPO objective of one optimizer step, as the `loss_fn` a backend's `train_step` calls per micro-batch.

loss = agg over the GLOBAL batch of [pg + kl_coef·kl − entropy_coef·entropy], so the loss and its gradient
do not depend on how the batch is split into micro-batches or data-parallel ranks (REFERENCE §4). Each
variant (advantage estimator, policy loss, KL estimator, aggregation) is the one the recipe's `grpo` section
names, looked up in `trainer.algo`'s registries. With `grpo.tis_cap` set, each token's policy loss is first
multiplied by its truncated importance weight min(p_old / p_engine, cap) (`trainer.algo.mismatch`); off (None),
that step does not run at all. A term whose coefficient is 0 is logged but kept out of the
graph, so nothing it computes (say an inf far from the reference) can reach the gradient.
Metrics are returned pre-weighted by the micro-batch's share of the denominator, so the backend's sum over
micro-batches is the global mean; they are detached device scalars (no host sync per micro-batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from matrix.schema import GRPO
from trainer.algo import (
    agg_denominator,
    agg_loss,
    get_adv_estimator,
    get_kl_estimator,
    get_policy_loss,
    global_denominator,
)
from trainer.algo.mismatch import truncated_is_metrics, truncated_is_weights
from trainer.backends.base import LossFn
from trainer.passes import ALL_PASSES, Passes


def advantages(grpo: GRPO, rewards: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages (B,) of rewards laid out as consecutive groups of `samples_per_prompt`."""
    return get_adv_estimator(grpo.advantage)(rewards, grpo.samples_per_prompt)


def _policy_loss_options(fn: Callable, grpo: GRPO) -> dict[str, object]:
    """The recipe's policy-loss options that `fn` takes (each registered loss declares its own)."""
    options = {"clip_low": grpo.clip_low, "clip_high": grpo.clip_high, "loss_cap": grpo.loss_cap,
               "dual_clip_c": grpo.dual_clip_c}
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in accepted}


def make_loss_fn(grpo: GRPO, global_tokens: float, passes: Passes = ALL_PASSES) -> LossFn:
    """`global_tokens`: response tokens in the whole step (all micro-batches, all DP ranks).

    `passes` (`trainer.passes`): which inputs the micro-batches carry. Without the old-log-prob pass the old
    log-probs are the detached `logp` of this forward (ratio exactly 1); without the reference pass there is
    no KL term and no `loss/kl` metric (the recipe check refuses kl_coef > 0 without it).
    With `grpo.tis_cap`, the micro-batches carry `engine_logprobs` (B, T), and the truncated importance weights
    compare them with those same old log-probs: this forward's are the weights the engine sampled with (the
    pass is skipped only for one deterministic step per episode), so the weights equal the separate pass's.
    """
    policy_loss = get_policy_loss(grpo.policy_loss)
    options = _policy_loss_options(policy_loss, grpo)
    kl_estimator = get_kl_estimator(grpo.kl_estimator)
    # Every sequence holds at least one response token (the engine always samples one), so the sequences
    # seq-mean-token-mean divides by are the episode's prompts × samples, however DP splits the batch.
    # (Under CP a rank sees part of each sequence; the recipe check refuses that combination.)
    denominator = global_denominator(grpo.loss_agg, tokens=global_tokens,
                                     sequences=grpo.prompts_per_episode * grpo.samples_per_prompt)

    def mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return agg_loss(x, mask, denominator, grpo.loss_agg)

    def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, torch.Tensor]):
        mask = mb["response_mask"]
        old = mb["old_logprobs"] if passes.old_logprobs else logp.detach()
        pg, pg_metrics = policy_loss(logp, old, mb["advantages"], mask, **options)
        if grpo.tis_cap is not None:
            pg = pg * truncated_is_weights(old, mb["engine_logprobs"], grpo.tis_cap)
            pg_metrics |= truncated_is_metrics(old, mb["engine_logprobs"], mask, grpo.tis_cap)
        per_token = pg
        kl = None
        if grpo.kl_coef:
            kl = kl_estimator(logp, mb["ref_logprobs"])
            per_token = per_token + grpo.kl_coef * kl
        elif passes.reference:
            with torch.no_grad():
                kl = kl_estimator(logp, mb["ref_logprobs"])
        if grpo.entropy_coef:
            per_token = per_token - grpo.entropy_coef * entropy
        loss = mean(per_token, mask)
        share = agg_denominator(mask, grpo.loss_agg) / denominator  # float64, as the host's division was
        metrics = {"loss/total": loss.detach(),
                   "loss/pg": mean(pg.detach(), mask),
                   "loss/entropy": mean(entropy.detach(), mask)}
        if kl is not None:
            metrics["loss/kl"] = mean(kl.detach(), mask)
        metrics |= {k: v.detach().to(torch.float64) * share for k, v in pg_metrics.items()}
        return loss, metrics

    return loss_fn


def sft_loss_fn(global_tokens: float) -> LossFn:
    """Cross-entropy on response tokens (the demo's warm start), same aggregation as GRPO."""

    def loss_fn(logp: torch.Tensor, entropy: torch.Tensor, mb: dict[str, torch.Tensor]):
        loss = agg_loss(-logp, mb["response_mask"], global_tokens)
        return loss, {"loss/sft": loss.detach()}

    return loss_fn
