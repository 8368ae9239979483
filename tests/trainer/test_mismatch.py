"""Rollout–trainer mismatch metrics against hand-computed values, and on real engine/trainer log-probs: near
zero after a weight sync, moving when the engine's weights are stale."""

import math

import pytest
import torch

from trainer.algo.mismatch import mismatch_metrics, scatter_responses, truncated_is_weights
from trainer.backends.megatron import MegatronBackend
from trainer.batching import pack
from trainer.rollout import SamplingParams, TorchEngine


def test_hand_computed_values():
    # tokens 1–3 count; token 4 is masked out and would dominate every metric if it were not
    trainer = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.25, 0.125, 0.01]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    m = mismatch_metrics(trainer, engine, mask)
    # Δ = (log 2, 0, 0); r = (2, 1, 1)
    assert m["mismatch/logprob_abs_diff_mean"] == pytest.approx(math.log(2) / 3)
    assert m["mismatch/logprob_abs_diff_max"] == pytest.approx(math.log(2))
    assert m["mismatch/token_mult_prob_error"] == pytest.approx((2 + 1 + 1) / 3)
    assert m["mismatch/kl"] == pytest.approx((2 - math.log(2) - 1) / 3)
    # probabilities (.5, .25, .125) against (.25, .25, .125): r = sqrt(4/7) by hand
    assert m["mismatch/prob_pearson"] == pytest.approx(math.sqrt(4 / 7))


def test_identical_log_probs_are_no_mismatch():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.7], [0.1, 0.3, 0.6]]))
    m = mismatch_metrics(logp, logp.clone(), torch.ones(2, 3))
    assert m["mismatch/logprob_abs_diff_max"] == 0 and m["mismatch/kl"] == 0
    assert m["mismatch/token_mult_prob_error"] == 1 and m["mismatch/prob_pearson"] == pytest.approx(1)


def test_scatter_puts_each_response_under_its_mask():
    batch = pack([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    laid = scatter_responses(batch["response_mask"], [[-0.5, -0.25, -2.0], [-1.0]])
    assert laid.tolist() == [[0.0, -0.5, -0.25, -2.0], [-1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="sequence 1: 2 values for 1 response positions"):
        scatter_responses(batch["response_mask"], [[-0.1, -0.2, -0.3], [-0.4, -0.5]])


def test_truncated_importance_weights_are_capped_ratios():
    old = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    engine = torch.log(torch.tensor([0.25, 0.4, 0.1]))
    assert truncated_is_weights(old, engine, cap=2.0).tolist() == pytest.approx([2.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        truncated_is_weights(old, engine, cap=0.0)


def _episode(backend, engine, prompts):
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=10, seed=3))
    batch = pack(prompts, [o.token_ids for o in outs], pad_id=0)
    trainer = backend.logprobs(batch, micro_batch_size=8)
    engine_logprobs = scatter_responses(batch["response_mask"], [o.logprobs for o in outs])  # as the loop does
    return mismatch_metrics(trainer, engine_logprobs, batch["response_mask"])


def test_mismatch_is_near_zero_after_sync_and_moves_with_stale_engine_weights(matrix, groups):
    resolved = matrix.resolve("tiny-qwen2.5")
    backend = MegatronBackend(resolved, seed=1)
    engine = TorchEngine(resolved.model, decode=str, seed=2)
    prompts = [[1 + (7 * i + j) % 100 for j in range(3 + i % 5)] for i in range(16)]
    engine.update_weights(backend.hf_named_tensors())
    synced = _episode(backend, engine, prompts)
    assert synced["mismatch/logprob_abs_diff_max"] < 1e-5
    assert synced["mismatch/token_mult_prob_error"] == pytest.approx(1, abs=1e-5)
    assert abs(synced["mismatch/kl"]) < 1e-9 and synced["mismatch/prob_pearson"] > 0.99999
    with torch.no_grad():  # the trainer moves on; the engine keeps the weights of the last sync
        for p in backend.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = _episode(backend, engine, prompts)
    assert stale["mismatch/logprob_abs_diff_mean"] > 100 * max(synced["mismatch/logprob_abs_diff_mean"], 1e-7)
    assert stale["mismatch/token_mult_prob_error"] > 1.01 and stale["mismatch/kl"] > 1e-4
