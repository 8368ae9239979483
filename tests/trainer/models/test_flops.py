"""Forward FLOPs per token of a dense model, counted by hand for a small shape."""

import pytest

from matrix.schema import Model, Shape
from trainer.models.flops import flops_per_token


def dense(**shape) -> Model:
    base = {"layers": 2, "hidden": 8, "ffn_hidden": 16, "heads": 2, "query_groups": 1, "vocab": 10,
            "max_position": 64}
    return Model(family="qwen2", shape=Shape(**(base | shape)))


def test_hand_count():
    # per layer: q 8×8, k and v 8×4 each, o 8×8 → 192 weights; MLP 3×8×16 = 384; ×2 FLOPs = 1152
    # attention over 5 tokens: q·k and weights·v, 2 FLOPs each per head dim: 2×2×5×8 = 160; head 2×8×10 = 160
    assert flops_per_token(dense(), seq_len=5) == 2 * (1152 + 160) + 160


def test_longer_context_costs_more_attention_only():
    m = dense()
    assert flops_per_token(m, 10) - flops_per_token(m, 5) == 2 * 2 * 2 * 5 * 8


def test_families_not_counted_are_refused():
    m = Model(family="deepseek_v3", shape=Shape(layers=2, hidden=8, ffn_hidden=16, heads=2, query_groups=2,
                                                vocab=10, max_position=64,
                                                moe={"experts": 2, "topk": 1, "ffn_hidden": 8},
                                                mla={"q_lora_rank": None, "kv_lora_rank": 4, "qk_nope_head_dim": 4,
                                                     "qk_rope_head_dim": 2, "v_head_dim": 4}))
    with pytest.raises(NotImplementedError, match="deepseek_v3"):
        flops_per_token(m, 5)
