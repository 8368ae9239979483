"""What a model family provides (``FamilyBundle``) and the pieces every family shares.

A bundle is plain functions; ``trainer.models.build``, ``config``, ``weight_map``, ``flops`` and
``trainer.convert`` call them without knowing which family they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from matrix.schema import Layout, Model, Shape
from trainer.parallel.pp import SCHEDULE_CONFIG

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class UnsupportedConfig(ValueError):
    """A transformers config field (or value) the family does not build; the message names the field."""

    def __init__(self, field: str, why: str):
        super().__init__(f"config.json field {field!r}: {why}")
        self.field = field


@dataclass(frozen=True)
class FamilyBundle:
    name: str
    """matrix.schema.Family"""
    hf_model_type: str
    """config.json ``model_type``"""
    blocks: tuple[str, ...]
    """The Shape blocks the family needs (mla / moe / linear_attention); () for dense."""
    transformer_config: Callable[[Model, Layout], Any]
    """→ megatron ``TransformerConfig`` (or a subclass such as ``MLATransformerConfig``)"""
    layer_specs: Callable[[Model, Any, Any], Any]
    """(model, TransformerConfig, spec provider) → the ``transformer_layer_spec`` GPTModel takes for this
    pipeline stage; the provider comes from the platform (``trainer.platform``), never built by the family"""
    gpt_kwargs: Callable[[Model], dict]
    """rope arguments of ``GPTModel`` (position_embedding_type, rotary_base, rotary_percent)"""
    hf_config: Callable[[Model], Any]
    """→ transformers ``PretrainedConfig`` of the same model"""
    shape_from_hf: Callable[[Mapping[str, Any]], Shape]
    """config.json (a dict) → matrix Shape; ``UnsupportedConfig`` naming the first field it cannot build"""
    rules: Callable[[Shape], list]
    """→ ``weight_map.Rule`` list, in megatron's parameter order"""
    flops_per_token: Callable[[Shape, int], float]
    """(shape, context length) → forward FLOPs per token"""
    untrained: Callable[[Shape, str], bool] = lambda shape, name: False
    """(shape, HF tensor name) → whether the checkpoint's tensor belongs to a part not trained here (a
    multi-token-prediction head): conversion skips it instead of refusing the checkpoint"""
    hf_on_host: Callable[[], AbstractContextManager] = contextlib.nullcontext
    """→ the context transformers' model class is built in when it is to run on the host (the torch rollout
    engine) on a machine that has a GPU: a family whose transformers module chose GPU kernels at import, because
    a GPU is present, gets its host code paths"""


def torch_dtype(model: Model) -> torch.dtype:
    return _TORCH_DTYPES[model.dtype]


def head_dim(shape: Shape) -> int:
    """Per-head q/k/v dim of GQA attention: explicit (Qwen3) or hidden / heads."""
    return shape.head_dim if shape.head_dim is not None else shape.hidden // shape.heads


def cpu_config_kwargs(model: Model, layout: Layout | None) -> dict:
    """``TransformerConfig`` fields every family shares: sizes, RMSNorm + SwiGLU, no fusions, degrees, dtype.

    Where weights are initialised and the training dtype are the platform's (``Platform.megatron_fields``,
    applied by ``trainer.models.build``); the dtype here is the model's own, for configs read without a build."""
    shape, layout = model.shape, layout or Layout()
    dtype = torch_dtype(model)
    return dict(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn_hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 holds [gate; up], activation silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions are CUDA kernels (apex / TE); the unfused paths are plain torch.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # what pipeline stages exchange; megatron requires it as soon as pp > 1
        bf16=dtype == torch.bfloat16,
        # rms norm and softmax in fp32 like HF; for fp32 models these are no-ops.
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sequence_parallel,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        **SCHEDULE_CONFIG,
    )


def moe_config_kwargs(moe) -> dict:
    """megatron MoE fields every MoE family sets the same way: sizes, top-k, shared experts and the RL router
    settings of the matrix. The token dispatcher and grouped GEMMs are the platform's (``Platform.moe_fields``)."""
    return dict(
        num_moe_experts=moe.experts,
        moe_ffn_hidden_size=moe.ffn_hidden,
        moe_router_topk=moe.topk,
        moe_shared_expert_intermediate_size=moe.shared_hidden or None,
        moe_router_load_balancing_type=moe.router_load_balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_router_dtype=moe.router_dtype,
    )


def hf_common_kwargs(model: Model) -> dict:
    """transformers config fields every family shares."""
    shape = model.shape
    return dict(
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


# config.json keys that describe the checkpoint or generation, not the architecture.
_BOOKKEEPING = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
        "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "_name_or_path", "auto_map",
        "attention_dropout", "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict",
        "max_window_layers", "tokenizer_class", "generation_config", "layer_types",
    }
)


class HFConfigReader:
    """Reads a config.json dict field by field; ``leftover()`` fails on fields nobody read.

    ``get(key, default)`` reads a field; ``expect(key, allowed, why)`` fails unless the value is one of
    ``allowed`` (a missing key counts as ``allowed[0]``).
    """

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.config.get(key, default)

    def require(self, key: str) -> Any:
        self.read.add(key)
        if key not in self.config:
            raise UnsupportedConfig(key, "missing")
        return self.config[key]

    def expect(self, key: str, allowed: Iterable[Any], why: str) -> Any:
        allowed = list(allowed)
        value = self.get(key, allowed[0])
        if value not in allowed:
            raise UnsupportedConfig(key, f"{value!r} is not supported ({why})")
        return value

    def leftover(self) -> None:
        from transformers import PretrainedConfig

        generic = PretrainedConfig().to_dict()  # every config's generic fields; at their defaults they say nothing
        unread = sorted(
            key
            for key in set(self.config) - self.read - _BOOKKEEPING
            if not (key in generic and self.config[key] == generic[key])
        )
        if unread:
            raise UnsupportedConfig(unread[0], "not supported by this family's megatron-core build")

    def common_shape(self) -> dict:
        """Shape fields every family reads the same way."""
        self.expect("hidden_act", ["silu"], "the MLP is SwiGLU")
        return dict(
            layers=self.require("num_hidden_layers"),
            hidden=self.require("hidden_size"),
            ffn_hidden=self.require("intermediate_size"),
            heads=self.require("num_attention_heads"),
            query_groups=self.get("num_key_value_heads") or self.config["num_attention_heads"],
            vocab=self.require("vocab_size"),
            max_position=self.require("max_position_embeddings"),
            rope_theta=float(self.get("rope_theta", 10000.0)),
            norm_eps=float(self.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(self.get("tie_word_embeddings", False)),
        )
