"""Qwen3 (dense): GQA with per-head QK RMSNorm and an explicit head dim (``families/dense.py``)."""

from __future__ import annotations

from collections.abc import Mapping

from transformers import Qwen3Config

from matrix.schema import Model, Shape
from trainer.models.families import dense
from trainer.models.families.bundle import HFConfigReader, head_dim, hf_common_kwargs


def hf_config(model: Model) -> Qwen3Config:
    shape = model.shape
    if not shape.qk_norm:
        raise ValueError("transformers' Qwen3 always has QK-norm: set qk_norm: true")
    if shape.qkv_bias:
        # Qwen3's attention_bias also biases o_proj, which megatron's add_qkv_bias does not.
        raise ValueError("qwen3 has no q/k/v biases: set qkv_bias: false")
    return Qwen3Config(
        **hf_common_kwargs(model), head_dim=head_dim(shape), attention_bias=False, use_sliding_window=False
    )


def shape_from_hf(config: Mapping) -> Shape:
    reader = HFConfigReader(config)
    reader.expect("attention_bias", [False], "o_proj bias is not built")
    fields = dense.read_dense_shape(reader)
    shape = Shape(**fields, head_dim=reader.get("head_dim") or fields["hidden"] // fields["heads"], qk_norm=True)
    reader.leftover()
    return shape


BUNDLE = dense.dense_bundle("qwen3", hf_config=hf_config, shape_from_hf=shape_from_hf)
