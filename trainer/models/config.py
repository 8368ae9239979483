"""A matrix model → megatron ``TransformerConfig`` and → the transformers config of the same model.

Both dispatch to the model's family bundle (``trainer.models.families``); the weight rules
(``weight_map.py``) translate parameters between the two, and the logit-equality tests check that the
pair really is the same model.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from matrix.schema import Layout, Model
from trainer.models.families import family
from trainer.models.families.bundle import head_dim, torch_dtype

__all__ = ["head_dim", "hf_config", "torch_dtype", "transformer_config"]


def transformer_config(model: Model, layout: Layout | None = None) -> TransformerConfig:
    """The megatron ``TransformerConfig`` of ``model`` under ``layout`` (its family decides the fields)."""
    return family(model.family).transformer_config(model, layout)


def hf_config(model: Model) -> PretrainedConfig:
    """The transformers config of ``model``, as config.json holds it."""
    return family(model.family).hf_config(model)
