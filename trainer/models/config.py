"""A matrix model shape → megatron ``TransformerConfig`` and → the transformers config of the same model.

Both configs describe one architecture; the weight maps (``weight_map.py``) translate parameters between
the two, and the logit-equality tests check that the pair really is the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig, Qwen2Config, Qwen3Config

from matrix.schema import Layout, Model, Shape
from trainer.models.families import DENSE_FAMILIES

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def head_dim(shape: Shape) -> int:
    """Per-head q/k/v dim: explicit (Qwen3) or hidden / heads."""
    return shape.head_dim if shape.head_dim is not None else shape.hidden // shape.heads


def torch_dtype(model: Model) -> torch.dtype:
    return _TORCH_DTYPES[model.dtype]


def require_dense(model: Model) -> None:
    """Refuse families whose megatron modules this backend does not build yet."""
    if model.family not in DENSE_FAMILIES:
        raise NotImplementedError(
            f"model family {model.family!r} is not built on the megatron CPU backend yet; "
            f"built families: {', '.join(DENSE_FAMILIES)}"
        )


def transformer_config(model: Model, layout: Layout | None = None) -> TransformerConfig:
    """The megatron ``TransformerConfig`` of a dense GQA model (Qwen2 / Qwen3) under ``layout``."""
    require_dense(model)
    shape, layout = model.shape, layout or Layout()
    dtype = torch_dtype(model)
    return TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn_hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.query_groups,
        kv_channels=head_dim(shape),
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 holds [gate; up], activation silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions are CUDA kernels (apex / TE); the unfused paths are plain torch.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # what stages exchange; megatron requires it as soon as pp > 1
        bf16=dtype == torch.bfloat16,
        # rms norm and softmax in fp32 like HF; for fp32 models these are no-ops.
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sequence_parallel,
    )


def hf_config(model: Model) -> PretrainedConfig:
    """The transformers config (``Qwen2Config`` / ``Qwen3Config``) of a dense model, as config.json holds it."""
    require_dense(model)
    shape = model.shape
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn_hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.query_groups,
        max_position_embeddings=shape.max_position,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.norm_eps,
        tie_word_embeddings=shape.tie_embeddings,
        hidden_act="silu",
        attention_dropout=0.0,
        dtype=torch_dtype(model),
        use_cache=True,
    )
    if model.family == "qwen2":
        if shape.qk_norm:
            raise ValueError("qwen2 has no QK-norm; a shape with qk_norm: true belongs to family qwen3")
        if shape.head_dim not in (None, shape.hidden // shape.heads):
            raise ValueError(
                f"qwen2 needs head_dim = hidden / heads = {shape.hidden // shape.heads}, got {shape.head_dim}"
            )
        # transformers' Qwen2 always has q/k/v biases; a bias-free qwen2 shape would not round-trip.
        if not shape.qkv_bias:
            raise ValueError("transformers' Qwen2 always has q/k/v biases: set qkv_bias: true")
        return Qwen2Config(**common, use_sliding_window=False)
    if not shape.qk_norm:
        raise ValueError("transformers' Qwen3 always has QK-norm: set qk_norm: true")
    if shape.qkv_bias:
        # Qwen3's attention_bias also biases o_proj, which megatron's add_qkv_bias does not.
        raise ValueError("qwen3 has no q/k/v biases: set qkv_bias: false")
    return Qwen3Config(**common, head_dim=head_dim(shape), attention_bias=False, use_sliding_window=False)
