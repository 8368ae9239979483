"""Qwen2 / Qwen2.5: dense GQA with q/k/v biases (``families/dense.py`` holds the shared pieces)."""

from __future__ import annotations

from collections.abc import Mapping

from transformers import Qwen2Config

from matrix.schema import Model, Shape
from trainer.models.families import dense
from trainer.models.families.bundle import HFConfigReader, hf_common_kwargs


def hf_config(model: Model) -> Qwen2Config:
    shape = model.shape
    if shape.qk_norm:
        raise ValueError("qwen2 has no QK-norm; a shape with qk_norm: true belongs to family qwen3")
    if shape.head_dim not in (None, shape.hidden // shape.heads):
        raise ValueError(
            f"qwen2 needs head_dim = hidden / heads = {shape.hidden // shape.heads}, got {shape.head_dim}"
        )
    # transformers' Qwen2 always has q/k/v biases; a bias-free qwen2 shape would not round-trip.
    if not shape.qkv_bias:
        raise ValueError("transformers' Qwen2 always has q/k/v biases: set qkv_bias: true")
    return Qwen2Config(**hf_common_kwargs(model), use_sliding_window=False)


def shape_from_hf(config: Mapping) -> Shape:
    reader = HFConfigReader(config)
    shape = Shape(**dense.read_dense_shape(reader), qkv_bias=True)
    reader.leftover()
    return shape


BUNDLE = dense.dense_bundle("qwen2", hf_config=hf_config, shape_from_hf=shape_from_hf)
