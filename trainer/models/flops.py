"""Forward FLOPs per token of a model at a context length (training = 3x: forward + backward).

Minimal dense-only version (GQA attention + SwiGLU MLP + LM head), written for the bench's MFU; the model
families work replaces it with one that covers MLA, MoE and linear attention behind the same signature.
"""

from __future__ import annotations

from matrix.schema import Model


def flops_per_token(model: Model, seq_len: int) -> float:
    """Forward FLOPs of one token seeing ``seq_len`` tokens of context: 2 per multiply-add of every weight
    matrix, plus the attention scores (q·k) and the weighted sum of values over the context."""
    s = model.shape
    if s.moe is not None or s.mla is not None or s.linear_attention is not None:
        raise NotImplementedError(f"FLOPs of family {model.family} are not counted yet (dense models only)")
    head_dim = s.head_dim if s.head_dim is not None else s.hidden // s.heads
    q_width, kv_width = s.heads * head_dim, s.query_groups * head_dim
    attention_weights = s.hidden * (q_width + 2 * kv_width) + q_width * s.hidden
    mlp_weights = 3 * s.hidden * s.ffn_hidden  # gate, up and down projections
    per_layer = 2 * (attention_weights + mlp_weights) + 2 * 2 * seq_len * q_width
    return s.layers * per_layer + 2 * s.hidden * s.vocab
