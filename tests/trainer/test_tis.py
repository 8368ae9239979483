"""Truncated importance sampling (`grpo.tis_cap`): off, the loss is bit-identical; on, each token's policy-loss
gradient is scaled by exactly min(p_old / p_engine, cap), against a hand computation."""

import math

import pytest
import torch

from matrix.schema import GRPO
from trainer.algo import agg_loss, ppo_clip_loss
from trainer.objective import make_loss_fn
from trainer.passes import Passes

BASE = {"prompts_per_episode": 1, "samples_per_prompt": 2, "max_prompt_len": 8, "max_response_len": 8}
TOKENS = 5  # response tokens of the micro-batch below
OLD = [[-1.0, -1.0, -2.0, -0.5], [-1.0, -3.0, -0.25, -1.0]]
# engine log-probs: position 0 is prompt and row 1's position 3 padding (0 there, as scatter_responses leaves them)
ENGINE = [[0.0, -1.0, -2.5, -4.0], [0.0, -2.0, -0.5, 0.0]]


def grpo(**fields) -> GRPO:
    return GRPO.model_validate(BASE | fields)


def micro_batch(engine=ENGINE) -> dict[str, torch.Tensor]:
    return {"response_mask": torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
            "old_logprobs": torch.tensor(OLD, dtype=torch.float64),
            "engine_logprobs": torch.tensor(engine, dtype=torch.float64),
            "advantages": torch.tensor([1.0, -0.5], dtype=torch.float64)}


NO_REFERENCE = Passes(reference=False)  # kl_coef 0: the micro-batches carry no reference log-probs


def loss_and_grad(g: GRPO, mb: dict, logp=OLD, passes: Passes = NO_REFERENCE):
    """(loss, d loss / d logp, metrics) of the objective on `mb`, in float64."""
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    loss, metrics = make_loss_fn(g, TOKENS, passes)(logp, torch.zeros_like(logp), mb)
    loss.backward()
    return loss, logp.grad, metrics


def test_off_is_bit_identical_to_the_loss_without_engine_logprobs():
    """tis_cap None: engine log-probs in the batch (however far off) change no bit of the loss or gradient."""
    logp = [[-1.2, -0.9, -2.1, -0.4], [-1.0, -2.8, -0.3, -1.1]]  # off-policy: ratio ≠ 1, clipping active
    mb = micro_batch(engine=[[5.0, -9.0, 3.0, -20.0], [1.0, 7.0, -30.0, 2.0]])
    loss, grad, metrics = loss_and_grad(grpo(), mb, logp)
    without = {k: v for k, v in mb.items() if k != "engine_logprobs"}
    loss_without, grad_without, _ = loss_and_grad(grpo(), without, logp)
    assert torch.equal(loss, loss_without) and torch.equal(grad, grad_without)
    # ... and it is the policy loss aggregated as before TIS existed
    reference = torch.tensor(logp, dtype=torch.float64)
    pg, _ = ppo_clip_loss(reference, mb["old_logprobs"], mb["advantages"], loss_cap=3.0)
    assert torch.equal(loss.detach(), agg_loss(pg, mb["response_mask"], TOKENS))
    assert not any(k.startswith("tis/") for k in metrics)


def test_engine_equal_to_old_gives_weight_one_and_the_same_loss():
    mb = micro_batch(engine=OLD)
    loss, grad, metrics = loss_and_grad(grpo(tis_cap=2.0), mb)
    loss_off, grad_off, _ = loss_and_grad(grpo(), mb)
    assert torch.equal(loss, loss_off) and torch.equal(grad, grad_off)
    assert metrics["tis/weight_mean"] == 1.0 and metrics["tis/clipped_fraction"] == 0.0


@pytest.mark.parametrize("cap", [1.0, 2.0])
def test_each_tokens_gradient_is_scaled_by_its_capped_ratio(cap):
    """By hand: w = min(exp(old - engine), cap) per response token; the gradient of the TIS loss is w times the
    gradient without it, token by token, and prompt / padding positions still get none."""
    mb = micro_batch()
    _, grad, metrics = loss_and_grad(grpo(tis_cap=cap), mb)
    _, grad_off, _ = loss_and_grad(grpo(), mb)
    mask = mb["response_mask"].bool()
    response = [(i, j) for i in range(2) for j in range(4) if mask[i, j]]
    ratio = {(i, j): math.exp(OLD[i][j] - ENGINE[i][j]) for i, j in response}  # 1, e^.5, e^3.5; e^-1, e^.25
    weight = {t: min(r, cap) for t, r in ratio.items()}
    for i, j in response:
        assert grad[i, j].item() == pytest.approx(weight[i, j] * grad_off[i, j].item(), rel=1e-12)
        # on-policy (logp = old): pg = -A·ratio_ppo, so d loss / d logp = -A·w / tokens
        assert grad[i, j].item() == pytest.approx(-mb["advantages"][i].item() * weight[i, j] / TOKENS, rel=1e-12)
    assert grad[~mask].eq(0).all()
    assert metrics["tis/weight_mean"] == pytest.approx(sum(weight.values()) / TOKENS, rel=1e-12)
    assert metrics["tis/clipped_fraction"] == pytest.approx(sum(r > cap for r in ratio.values()) / TOKENS)


def test_without_the_old_logprob_pass_the_weights_use_the_training_forward():
    """Where the separate pass is skipped, old log-probs are this forward's (the weights the engine sampled with)."""
    logp = [[-1.3, -0.7, -2.2, -0.6], [-1.0, -2.6, -0.4, -1.0]]
    mb = {k: v for k, v in micro_batch().items() if k != "old_logprobs"}
    _, grad, _ = loss_and_grad(grpo(tis_cap=2.0), mb, logp, Passes(old_logprobs=False, reference=False))
    _, grad_off, _ = loss_and_grad(grpo(), mb, logp, Passes(old_logprobs=False, reference=False))
    mask = mb["response_mask"].bool()
    for i, j in [(i, j) for i in range(2) for j in range(4) if mask[i, j]]:
        weight = min(math.exp(logp[i][j] - ENGINE[i][j]), 2.0)
        assert grad[i, j].item() == pytest.approx(weight * grad_off[i, j].item(), rel=1e-12)


@pytest.mark.parametrize(("cap", "words"), [(0.5, "tis_cap 0.5 < 1 would scale down"), (0.0, "greater than 0")])
def test_cap_below_one_is_refused(cap, words):
    with pytest.raises(ValueError, match=words):
        grpo(tis_cap=cap)
