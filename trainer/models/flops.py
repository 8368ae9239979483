"""Forward FLOPs per token of a matrix model, for MFU: each family counts its own layers.

Convention (all families): a multiply-add is 2 FLOPs; counted are the matmuls of every linear layer a
token goes through (attention projections, MLP or the *active* experts plus shared experts and the router,
linear-attention projections, the output head; not the embedding lookup) and attention's QKᵀ and AV at the
causal mean context (seq_len + 1) / 2 (position t attends to t + 1 keys). Norms, rope, softmax and
activations are left out (a few per mille at these sizes). Training costs 3× the forward (forward +
backward's two matmuls per forward matmul), plus one more forward under full recompute.
"""

from __future__ import annotations

from matrix.schema import Model


def flops_per_token(model: Model, seq_len: int) -> float:
    """Forward FLOPs per token at context length ``seq_len`` (training: 3× this; see the module docstring)."""
    from trainer.models.families import family

    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return float(family(model.family).flops_per_token(model.shape, seq_len))


def attention_core(heads: int, qk_dim: int, v_dim: int, seq_len: int) -> float:
    """QKᵀ and AV of one causal attention layer, per token, averaged over the positions of a sequence."""
    mean_context = (seq_len + 1) / 2
    return 2.0 * heads * (qk_dim + v_dim) * mean_context


def swiglu(hidden: int, ffn: int) -> float:
    """gate, up and down projections of a SwiGLU MLP."""
    return 2.0 * 3 * hidden * ffn


def output_head(hidden: int, vocab: int) -> float:
    return 2.0 * hidden * vocab
