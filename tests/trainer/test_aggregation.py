"""Loss aggregation: hand-computed values and the MUST-SHOW split-independence of loss and gradient."""

import pytest
import torch

from trainer.algo.advantages import grpo_advantages
from trainer.algo.aggregation import agg_denominator, agg_loss
from trainer.algo.policy_loss import ppo_clip_loss
from trainer.algo.registry import UnknownVariantError

MODES = ["token-mean", "seq-mean-token-mean"]


def test_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert agg_denominator(mask).item() == 3
    assert agg_loss(loss, mask, 3).item() == pytest.approx((1 + 2 + 4) / 3)
    # sequence mode: the all-padding row does not count; (1.5 + 4) / 2
    assert agg_denominator(mask, "seq-mean-token-mean").item() == 2
    assert agg_loss(loss, mask, 2, "seq-mean-token-mean").item() == pytest.approx(2.75)


def test_bad_mode_and_denominator():
    with pytest.raises(UnknownVariantError, match="token-mean"):
        agg_denominator(torch.ones(1, 1), "token-sum")
    with pytest.raises(ValueError, match="global_denominator"):
        agg_loss(torch.ones(1, 1), torch.ones(1, 1), 0)


def _batch(seed=0, groups=4, n=4, t=7, vocab=5, hidden=3):
    """A fixed GRPO batch: features, sampled tokens, old log-probs, variable-length response masks."""
    g = torch.Generator().manual_seed(seed)
    b = groups * n
    x = torch.randn(b, t, hidden, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    old_logp = -torch.rand(b, t, generator=g, dtype=torch.float64) - 1.0
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    adv = grpo_advantages(torch.randint(0, 2, (b,), generator=g).double(), group_size=n)
    return x, tokens, old_logp, mask, adv


def _step(weight, batch, dp_ranks, micro_batches, mode):
    """Loss and gradient of one optimizer step, the batch split over ``dp_ranks`` x ``micro_batches``.

    Rank gradients are summed (a SUM all-reduce) and the denominator counts the whole batch, exactly as
    the trainer does it; micro-batches within a rank accumulate gradients by ``.backward()``.
    """
    x, tokens, old_logp, mask, adv = batch
    rank_slices = torch.arange(x.shape[0]).chunk(dp_ranks)
    # every rank counts its own micro-batches; the "all-reduce" sums the ranks
    denom = sum(agg_denominator(mask[idx], mode) for idx in rank_slices)
    total_loss, total_grad = 0.0, torch.zeros_like(weight)
    for idx in rank_slices:
        w = weight.detach().clone().requires_grad_(True)  # each rank holds a replica
        for mb in idx.chunk(micro_batches):
            logp = torch.log_softmax(x[mb] @ w, dim=-1).gather(-1, tokens[mb, :, None]).squeeze(-1)
            per_token, _ = ppo_clip_loss(logp, old_logp[mb], adv[mb], mask[mb])
            loss = agg_loss(per_token, mask[mb], denom, mode)
            loss.backward()
            total_loss += loss.item()
        total_grad += w.grad
    return total_loss, total_grad


@pytest.mark.parametrize("mode", MODES)
def test_split_independence_loss_and_gradient(mode):
    """MUST SHOW: 1, 2, 4 micro-batches and 2 simulated DP ranks give the same loss and gradient."""
    batch = _batch()
    weight = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_loss, ref_grad = _step(weight, batch, dp_ranks=1, micro_batches=1, mode=mode)
    assert ref_grad.abs().sum() > 0
    for dp_ranks, micro_batches in [(1, 2), (1, 4), (2, 1), (2, 2), (2, 4)]:
        loss, grad = _step(weight, batch, dp_ranks, micro_batches, mode)
        assert loss == pytest.approx(ref_loss, abs=1e-6), (dp_ranks, micro_batches)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_per_micro_batch_mean_would_depend_on_split():
    """The check above can fail: verl's pre-0.7 per-micro-batch token mean gives a different loss."""
    x, tokens, old_logp, mask, adv = _batch()
    per_token, _ = ppo_clip_loss(old_logp, old_logp, adv, mask)  # ratio 1: per-token loss = -A
    whole = agg_loss(per_token, mask, agg_denominator(mask)).item()
    halves = [
        agg_loss(per_token[i], mask[i], agg_denominator(mask[i])).item() / 2
        for i in torch.arange(x.shape[0]).chunk(2)
    ]
    assert abs(sum(halves) - whole) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_values_at_masked_positions_do_not_reach_the_loss(mode):
    loss = torch.tensor([[float("inf"), 2.0], [float("nan"), 4.0]], requires_grad=True)
    mask = torch.tensor([[0, 1], [0, 1]])
    out = agg_loss(loss, mask, agg_denominator(mask, mode), mode)
    assert out.item() == pytest.approx(3.0)
    out.backward()
    assert loss.grad.tolist() == [[0.0, 0.5], [0.0, 0.5]]
