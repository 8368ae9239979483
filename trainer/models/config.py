"""A matrix model → megatron ``TransformerConfig`` and → the transformers config of the same model, and a
config.json → the matrix model it describes.

Both dispatch to the model's family bundle (``trainer.models.families``); the weight rules
(``weight_map.py``) translate parameters between the two, and the logit-equality tests check that the
pair really is the same model.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core.transformer.transformer_config import TransformerConfig
from pydantic import ValidationError
from transformers import PretrainedConfig

from matrix.schema import Layout, Model
from trainer.models.families import family, family_of_hf
from trainer.models.families.bundle import UnsupportedConfig, head_dim, torch_dtype
from trainer.models.weight_files import WeightsError

__all__ = ["head_dim", "hf_config", "model_from_hf_config", "torch_dtype", "transformer_config"]

_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


def transformer_config(model: Model, layout: Layout | None = None) -> TransformerConfig:
    """The megatron ``TransformerConfig`` of ``model`` under ``layout`` (its family decides the fields)."""
    return family(model.family).transformer_config(model, layout)


def hf_config(model: Model) -> PretrainedConfig:
    """The transformers config of ``model``, as config.json holds it."""
    return family(model.family).hf_config(model)


def model_from_hf_config(config: dict, *, where: Path) -> Model:
    """The matrix ``Model`` a config.json describes (family from ``model_type``)."""
    model_type = config.get("model_type")
    try:
        bundle = family_of_hf(model_type)
        shape = bundle.shape_from_hf(config)
    except (LookupError, UnsupportedConfig) as e:
        raise WeightsError(f"{where}: {e}") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise WeightsError(f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in _DTYPES:
        raise WeightsError(f"{where}: config.json field 'torch_dtype': {dtype!r} is not supported (bfloat16, float32)")
    return Model(family=bundle.name, dtype=_DTYPES[dtype], shape=shape)
