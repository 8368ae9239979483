"""Where `prepare` puts a recipe's weights and data, and where `train` finds them (no flags).

``<prepared>/<model>/`` holds ``source/`` (downloaded), ``bf16/`` (cast), ``hf/`` (config fixed: what FSDP
loads, and the tokenizer) and ``mcore-<layout>/`` (what megatron-core loads, sharded for that layout); the data
goes to the recipe's ``data.path``, its raw files to ``<prepared>/data/<source>/``; ``<prepared>/manifest.json``
records the finished steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from matrix import Matrix, ResolvedRecipe

ROOT = Path(__file__).resolve().parent.parent.parent
MANIFEST = "manifest.json"


def prepared_root(matrix: Matrix) -> Path:
    return ROOT / matrix.prepared  # an absolute `prepared` stays absolute


def model_dir(matrix: Matrix, model_name: str) -> Path:
    return prepared_root(matrix) / model_name


def weights_dir(matrix: Matrix, r: ResolvedRecipe) -> Path:
    """The folder a run of ``r`` starts from: the megatron-core conversion for its layout, or the HF folder."""
    base = model_dir(matrix, r.recipe.model)
    return base / "hf" if r.recipe.trainer == "fsdp" else base / f"mcore-{r.recipe.layout}"


def data_file(r: ResolvedRecipe) -> Path | None:
    return ROOT / r.recipe.data.path if r.recipe.data.path else None


def needs_prepare(r: ResolvedRecipe) -> bool:
    """Hub weights with no ``weights`` folder given, or data to preprocess: `prepare` makes them."""
    return bool(r.model.hf_id and not r.model.weights) or r.recipe.data.source != "demo"


def finished(matrix: Matrix, output: Path) -> bool:
    """Whether the manifest records a finished step that wrote ``output``."""
    try:
        steps = json.loads((prepared_root(matrix) / MANIFEST).read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return False
    return output.exists() and any(str(output) in s.get("outputs", {}) for s in steps.values())


def with_prepared_weights(matrix: Matrix, r: ResolvedRecipe) -> ResolvedRecipe:
    """``r`` with ``model.weights`` set to what `prepare` made for it, when the model names no folder itself and
    a finished one is there; else ``r`` unchanged (preflight then names the prepare command)."""
    if r.model.weights or not r.model.hf_id:
        return r
    found = weights_dir(matrix, r)
    if not finished(matrix, found):
        return r
    return r.model_copy(update={"model": r.model.model_copy(update={"weights": str(found)})})


def tokenizer_source(r: ResolvedRecipe) -> str:
    """The tokenizer beside the weights a run starts from (a prepared ``mcore-<layout>`` folder's sibling
    ``hf``), so an air-gapped run needs no hub; else the hub id."""
    if r.model.weights:
        weights = Path(r.model.weights)
        for folder in (weights, weights.parent / "hf"):
            if (folder / "tokenizer_config.json").is_file():
                return str(folder)
    return r.model.hf_id
