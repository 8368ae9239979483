"""FLOPs per token against hand counts (multiply-adds written out per matmul, ×2)."""

import pytest

from trainer.models.flops import flops_per_token


def test_dense_gqa_hand_count(matrix):
    # tiny-qwen2.5: 2 layers, hidden 64, ffn 128, 4 heads of 16, 2 kv groups, vocab 128; seq_len 64
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64
    mlp = 3 * 64 * 128
    scores_and_values = 4 * (16 + 16) * (64 + 1) / 2  # causal mean context 32.5
    head = 64 * 128
    macs = 2 * (q + k + v + o + mlp + scores_and_values) + head
    assert flops_per_token(matrix.models["tiny-qwen2.5"], 64) == pytest.approx(2 * macs, rel=1e-12)
    assert 2 * macs == 180480


def test_qwen3_uses_explicit_head_dim_and_grows_with_context(matrix):
    model = matrix.models["qwen3-8b"]  # 36 layers, 4096 wide, 32 heads × 128, 8 kv groups, ffn 12288
    per_layer_linear = 4096 * 128 * (32 + 8 + 8 + 32) + 3 * 4096 * 12288
    linear = 2 * (36 * per_layer_linear + 4096 * 151936)
    attention = lambda s: 2 * 36 * 32 * 256 * (s + 1) / 2  # noqa: E731
    assert flops_per_token(model, 4096) == pytest.approx(linear + attention(4096), rel=1e-12)
    # ~ 2 × 8.2e9 parameters (the embedding lookup is not a matmul): the familiar 2N per token
    assert 15e9 < flops_per_token(model, 1) < 17e9


def test_seq_len_must_be_positive(matrix):
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(matrix.models["tiny-qwen3"], 0)
