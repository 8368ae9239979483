"""Qwen3-Next: gated delta-net (linear attention) layers, a gated full-attention layer every
``full_attention_interval``, MoE with a gated shared expert in every layer.

Only the FLOPs count lives here yet: the megatron-core build, weight rules and transformers config are not
written, and every one of them says so (``NotImplementedError`` naming the family), so the trainer and the
converter refuse qwen3_next while MFU can already be computed for its recipes.
"""

from __future__ import annotations

from matrix.schema import Shape
from trainer.models import flops
from trainer.models.families.bundle import FamilyBundle, head_dim


def _not_built(*_args, **_kwargs):
    raise NotImplementedError(
        "model family 'qwen3_next' is not built on the megatron backend yet (gated delta net, gated attention, "
        "zero-centred norms); built families: qwen2, qwen3, deepseek_v3"
    )


def is_full_attention(shape: Shape, layer: int) -> bool:
    """transformers' layer_types: every full_attention_interval-th layer (1-based) is full attention."""
    return (layer + 1) % shape.linear_attention.full_attention_interval == 0


def gated_delta_net_flops(shape: Shape) -> float:
    """Projections, the depthwise causal conv, and the recurrent delta rule: per value head and token,
    S·k, the rank-1 update β(v − S·k)·kᵀ and the readout Sᵀ·q (3 · dk · dv multiply-adds). The chunked form
    computes the same recurrence; its cost does not grow with context."""
    la, h = shape.linear_attention, shape.hidden
    qk, v = la.key_heads * la.key_head_dim, la.value_heads * la.value_head_dim
    projections = h * (2 * qk + 2 * v) + h * 2 * la.value_heads + v * h  # in_proj_qkvz, in_proj_ba, out_proj
    conv = la.conv_kernel * (2 * qk + v)
    recurrence = 3 * la.value_heads * la.key_head_dim * la.value_head_dim
    return 2.0 * (projections + conv + recurrence)


def gated_attention_flops(shape: Shape, seq_len: int) -> float:
    """GQA whose q projection also yields a per-head output gate (2× q rows)."""
    hd = head_dim(shape)
    projections = shape.hidden * hd * (2 * shape.heads + 2 * shape.query_groups + shape.heads)  # q+gate, k, v, o
    return 2.0 * projections + flops.attention_core(shape.heads, hd, hd, seq_len)


def moe_flops(shape: Shape) -> float:
    """Router, the top-k routed experts, the shared expert(s) and their scalar gate."""
    moe, h = shape.moe, shape.hidden
    routed_and_shared = flops.swiglu(h, moe.ffn_hidden * (moe.topk + moe.shared_experts))
    return 2.0 * h * moe.experts + routed_and_shared + (2.0 * h if moe.shared_experts else 0.0)


def flops_per_token(shape: Shape, seq_len: int) -> float:
    mixers = sum(
        gated_attention_flops(shape, seq_len) if is_full_attention(shape, i) else gated_delta_net_flops(shape)
        for i in range(shape.layers)
    )
    return mixers + shape.layers * moe_flops(shape) + flops.output_head(shape.hidden, shape.vocab)


BUNDLE = FamilyBundle(
    name="qwen3_next",
    hf_model_type="qwen3_next",
    blocks=("moe", "linear_attention"),
    transformer_config=_not_built,
    layer_specs=_not_built,
    gpt_kwargs=_not_built,
    hf_config=_not_built,
    shape_from_hf=_not_built,
    rules=_not_built,
    flops_per_token=flops_per_token,
)
