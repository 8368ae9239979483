"""Model families, one module each, registered by name: adding a family touches one file here.

Each family module defines ``BUNDLE`` (a ``trainer.models.families.bundle.FamilyBundle``): matrix model →
megatron ``TransformerConfig``, decoder layer specs, ``GPTModel`` rope arguments, the transformers config,
a transformers config → matrix shape (what conversion reads from ``config.json``), HF ↔ megatron weight
rules and forward FLOPs per token. This module stays light (no megatron-core import) because the
preflight reads ``BUILT_FAMILIES`` before anything heavy loads; bundles are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matrix.schema import Model, Shape
    from trainer.models.families.bundle import FamilyBundle

# family name (matrix.schema.Family) → module defining BUNDLE
_MODULES = {
    "qwen2": "trainer.models.families.qwen2",
    "qwen3": "trainer.models.families.qwen3",
    "qwen3_moe": "trainer.models.families.qwen3_moe",  # transformers' model on FSDP2 only
    "deepseek_v3": "trainer.models.families.deepseek_v3",
    "qwen3_next": "trainer.models.families.qwen3_next",
}
_BUILT = ("qwen2", "qwen3", "deepseek_v3", "qwen3_next")

# FSDP2 trains transformers' own model class, so it takes the families whose HF config the bundle writes and
# whose transformers model it has been checked against (tests/trainer/backends/test_fsdp.py).
BUILT_FAMILIES = {"megatron": _BUILT, "fsdp": ("qwen2", "qwen3", "qwen3_moe")}


def family(name: str) -> FamilyBundle:
    """The bundle of a family; ``NotImplementedError`` naming the family when none is registered."""
    if name not in _MODULES:
        raise NotImplementedError(
            f"model family {name!r} is not built on the megatron backend yet; "
            f"built families: {', '.join(_BUILT)}"
        )
    return importlib.import_module(_MODULES[name]).BUNDLE


def family_of_hf(model_type: str) -> FamilyBundle:
    """The bundle whose transformers ``model_type`` (config.json) is ``model_type``; ``LookupError`` if none."""
    for name in _BUILT:
        bundle = family(name)
        if bundle.hf_model_type == model_type:
            return bundle
    known = ", ".join(family(n).hf_model_type for n in _BUILT)
    raise LookupError(f"model_type {model_type!r} is not a supported family (supported: {known})")


def bundle_of(model_or_shape: Model | Shape) -> FamilyBundle:
    """A model's bundle; for a bare shape, the family its blocks (mla / moe / linear_attention) imply.

    Shape-only callers (weight sync passes the shape) get a bundle whose weight rules fit the shape:
    families with the same blocks share their rules (qwen2 and qwen3 are one dense GQA rule set).
    """
    from matrix.schema import Model

    if isinstance(model_or_shape, Model):
        return family(model_or_shape.family)
    blocks = {b for b in ("mla", "moe", "linear_attention") if getattr(model_or_shape, b) is not None}
    for name in _MODULES:
        bundle = family(name)
        if set(bundle.blocks) == blocks:
            return bundle
    raise NotImplementedError(f"no built family has exactly the blocks {sorted(blocks) or 'none (dense)'}")
