"""Policy loss, KL and entropy against hand-computed numbers."""

import math

import pytest
import torch

from trainer.algo.entropy import entropy_from_logits
from trainer.algo.kl import get_kl_estimator, kl_k1, kl_k2, kl_k3
from trainer.algo.policy_loss import dual_clip_loss, get_policy_loss, ppo_clip_loss


def _loss(ratios, advantages, **kw):
    """Per-token loss for tokens with the given ratios (old_logp = 0), one sample per token."""
    logp = torch.log(torch.tensor(ratios, dtype=torch.float64)).unsqueeze(-1)
    return ppo_clip_loss(logp, torch.zeros_like(logp), torch.tensor(advantages, dtype=torch.float64), **kw)


def test_clip_cases_positive_and_negative_advantage():
    # A=+1: r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r=0.5 -> max(-0.5, -0.8) = -0.5
    # A=-1: r=1.5 -> max(1.5, 1.2) = 1.5; r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    loss, m = _loss([1.5, 0.5, 1.5, 0.5], [1.0, 1.0, -1.0, -1.0])
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([-1.2, -0.5, 1.5, 0.8], dtype=torch.float64))
    assert m["actor/pg_clipfrac"].item() == pytest.approx(0.5)
    # ppo_kl = mean(old - logp) = -mean(log r)
    assert m["actor/ppo_kl"].item() == pytest.approx(-(2 * math.log(1.5) + 2 * math.log(0.5)) / 4)


def test_asymmetric_clip_high():
    loss, _ = _loss([1.5, 0.5], [1.0, -1.0], clip_low=0.1, clip_high=0.28)
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([-1.28, 0.9], dtype=torch.float64))


def test_clipped_tokens_have_no_gradient():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]))
    loss.sum().backward()
    # d(-A * r)/dlogp = -A * r; the clipped token gets 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]]))


def test_loss_cap_constant_three():
    # A=-2, r=2: max(4.0, 2.4) = 4.0 -> capped to 3.0; A=-1, r=2: max(2, 1.2) = 2 stays
    loss, m = _loss([2.0, 2.0], [-2.0, -1.0])
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert m["actor/pg_capfrac"].item() == pytest.approx(0.5)
    uncapped, m = _loss([2.0, 2.0], [-2.0, -1.0], loss_cap=None)
    torch.testing.assert_close(uncapped.squeeze(-1), torch.tensor([4.0, 2.0], dtype=torch.float64))
    assert "actor/pg_capfrac" not in m


def test_log_ratio_clamped_at_ten():
    logp = torch.tensor([[50.0], [-50.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, torch.zeros(2, 1), torch.tensor([-1.0, -1.0]), loss_cap=None)
    # exp(min(50, 10)) = e^10; the low side is not clamped: r = e^-50 -> clip to 0.8
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([math.exp(10.0), 0.8]))
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_dual_clip():
    # A=-1, r=5: pg = max(5, 1.2) = 5 -> min(5, 3 * 1) = 3
    # A=-0.5, r=8: pg = 4 -> min(4, 1.5) = 1.5; A=-1, r=2: pg = 2 < 3 unchanged; A=+1, r=5: -1.2 untouched
    logp = torch.log(torch.tensor([[5.0], [8.0], [2.0], [5.0]], dtype=torch.float64))
    advs = torch.tensor([-1.0, -0.5, -1.0, 1.0], dtype=torch.float64)
    loss, m = dual_clip_loss(logp, torch.zeros_like(logp), advs)
    torch.testing.assert_close(loss.squeeze(-1), torch.tensor([3.0, 1.5, 2.0, -1.2], dtype=torch.float64))
    assert m["actor/pg_clipfrac_lower"].item() == pytest.approx(0.5)
    assert get_policy_loss("dual_clip") is dual_clip_loss
    with pytest.raises(ValueError, match="dual_clip_c"):
        dual_clip_loss(logp, logp, advs, dual_clip_c=1.0)


def test_metrics_respect_mask_and_token_advantages():
    logp = torch.log(torch.tensor([[1.5, 1.5, 1.0]]))
    mask = torch.tensor([[1, 0, 0]])
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 1.0]]), mask)
    assert loss.shape == (1, 3)
    assert m["actor/pg_clipfrac"].item() == 1.0  # only the first (clipped) token is counted
    with pytest.raises(ValueError, match=r"valid names are: \['dual_clip', 'vanilla'\]"):
        get_policy_loss("ppo")


def test_kl_estimators_hand_computed():
    logp = torch.zeros(5, dtype=torch.float64)
    ref = torch.tensor([0.0, 1.0, -1.0, 20.0, -20.0], dtype=torch.float64)
    # d = ref - logp; k3 = e^d - d - 1: 0, e - 2, e^-1, clamp(e^20 - 21) = 10, clamp(e^-20 + 19) = 10
    torch.testing.assert_close(
        kl_k3(logp, ref), torch.tensor([0.0, math.e - 2, math.exp(-1), 10.0, 10.0], dtype=torch.float64)
    )
    assert kl_k3(logp, ref, clamp=None)[4].item() == pytest.approx(math.exp(-20) + 19)
    torch.testing.assert_close(kl_k1(logp, ref), -ref)
    torch.testing.assert_close(kl_k2(logp, ref), 0.5 * ref**2)
    assert get_kl_estimator("k3") is kl_k3


def test_entropy_hand_computed_and_stable():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [5.0, -math.inf, -math.inf, -math.inf]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4), 0.0]]))
    big = torch.tensor([[1e4, 1e4, -1e4]])  # naive softmax(x) * log softmax(x) overflows in exp
    torch.testing.assert_close(entropy_from_logits(big), torch.tensor([math.log(2)]))


def test_entropy_matches_categorical_and_chunking():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), expected)
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32
