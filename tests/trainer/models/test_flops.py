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


def test_mla_moe_hand_count(matrix):
    """tiny-moonlight: 4 layers (1 dense, 3 MoE), hidden 64, 4 heads, MLA nope 16 / rope 8 / v 16 / kv_lora 32,
    no q_lora; 4 experts of 32, top-2, 1 shared expert; vocab 128. Only the 2 routed experts a token uses count."""
    q = 64 * 4 * (16 + 8)
    kv_down, kv_up = 64 * (32 + 8), 32 * 4 * (16 + 16)
    o = 4 * 16 * 64
    attention_core = 4 * ((16 + 8) + 16) * (64 + 1) / 2
    dense_mlp = 3 * 64 * 128
    moe = 64 * 4 + 3 * 64 * 32 * (2 + 1)  # router + 2 routed + 1 shared expert
    macs = 4 * (q + kv_down + kv_up + o + attention_core) + dense_mlp + 3 * moe + 64 * 128
    assert flops_per_token(matrix.models["tiny-moonlight"], 64) == pytest.approx(2 * macs, rel=1e-12)
    assert 2 * macs == 354432


def test_q_lora_and_active_experts_only(matrix):
    model = matrix.models["tiny-moonlight"]
    s = model.shape
    q_lora = model.model_copy(update={"shape": s.model_copy(update={"mla": s.mla.model_copy(update={"q_lora_rank": 24})})})
    # q_proj (64 → 96) becomes q_a (64 → 24) + q_b (24 → 96) in each of the 4 layers
    delta = 2 * 4 * ((64 * 24 + 24 * 96) - 64 * 96)
    assert flops_per_token(q_lora, 64) - flops_per_token(model, 64) == pytest.approx(delta)
    more = model.model_copy(update={"shape": s.model_copy(update={"moe": s.moe.model_copy(update={"experts": 64})})})
    # 60 more experts cost only their router rows, not their MLPs
    assert flops_per_token(more, 64) - flops_per_token(model, 64) == pytest.approx(2 * 3 * 64 * 60)


def test_deepseek_v3_is_about_37b_active(matrix):
    """DeepSeek-V3 activates ~37B parameters per token: forward ≈ 2 × 37e9 FLOPs at short context."""
    assert 2 * 35e9 < flops_per_token(matrix.models["deepseek-v3-671b"], 1) < 2 * 40e9


def test_gated_delta_net_hybrid_hand_count(matrix):
    """tiny-qwen3-next: layers 0-2 gated delta net (2 key heads, 4 value heads, dims 16, conv 4), layer 3 gated
    full attention (4 heads × 16, 2 kv groups, q projection doubled for the output gate); MoE everywhere
    (4 experts of 32, top-2, 1 shared expert + its scalar gate); vocab 128."""
    in_proj_qkvz, in_proj_ba, out_proj = 64 * (2 * 32 + 2 * 64), 64 * 2 * 4, 64 * 64
    conv = 4 * (2 * 32 + 64)
    recurrence = 3 * 4 * 16 * 16  # S·k, rank-1 update, Sᵀ·q per value head: context-free
    gdn = in_proj_qkvz + in_proj_ba + out_proj + conv + recurrence
    attention = 64 * 128 + 64 * 32 + 64 * 32 + 64 * 64 + 4 * 32 * (64 + 1) / 2
    moe = 64 * 4 + 3 * 64 * 32 * (2 + 1) + 64
    macs = 3 * gdn + attention + 4 * moe + 64 * 128
    model = matrix.models["tiny-qwen3-next"]
    assert flops_per_token(model, 64) == pytest.approx(2 * macs, rel=1e-12)
    assert 2 * macs == 330368
    # only the one full-attention layer grows with context
    assert flops_per_token(model, 65) - flops_per_token(model, 64) == pytest.approx(2 * 4 * 32 / 2)


def test_qwen3_next_is_about_3b_active(matrix):
    """Qwen3-Next-80B-A3B activates ~3B parameters per token (10 of 512 experts + the shared one), plus the
    0.3B output head: forward ≈ 2 × 3.6e9 FLOPs at short context."""
    assert 2 * 3.0e9 < flops_per_token(matrix.models["qwen3-next-80b-a3b"], 1) < 2 * 4.0e9
