"""Weights directories on disk, read: safetensors shards and their index, JSON files, megatron-core metadata.

What both a run (``trainer.models.pretrained``, loading its starting weights) and the offline converter
(``trainer.convert``, which also writes these directories) read. An HF checkpoint is ``config.json`` plus
``model.safetensors`` or ``model.safetensors.index.json`` with its shards; a megatron-core directory is
``mcore.json`` plus ``mcore.safetensors.index.json`` with its shards (global names, unsharded) or, sharded for a
layout, the per-rank files of ``trainer.models.sharded_weights``. Anything unreadable is one WeightsError line.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from matrix.schema import Model


class WeightsError(ValueError):
    """A weights directory that is missing, unreadable or for another model: one line naming it."""


HF_SINGLE, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
MCORE_INDEX, MCORE_META = "mcore.safetensors.index.json", "mcore.json"
FORMAT = 1  # mcore.json's "format": what trainer.convert writes


def read_json(path: Path) -> dict:
    """A JSON object file (config.json, an index, mcore.json); anything else is one WeightsError line."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except NotADirectoryError:
        raise WeightsError(f"{path.parent}: a file, where a checkpoint directory was expected") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: a directory, where a JSON file was expected") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: not UTF-8 (byte {e.start}); JSON files are UTF-8") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: a JSON {type(value).__name__}, where a JSON object {{...}} was expected")
    return value


@contextlib.contextmanager
def open_safetensors(path: Path):
    """``safe_open`` with a truncated, oversized or otherwise broken header as one WeightsError line."""
    try:
        f = safe_open(path, "pt")
    except IsADirectoryError:
        raise WeightsError(f"{path}: a directory, where a safetensors file was expected") from None
    except (SafetensorError, OSError) as e:
        raise WeightsError(
            f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]}); "
            "download or convert it again"
        ) from None
    with f:
        yield f


def weight_map(root: Path, *, index: str = HF_INDEX, single: str | None = HF_SINGLE) -> dict[str, str]:
    """tensor name → shard file of a checkpoint directory (index file, or the single-file form)."""
    if (root / index).exists():
        mapping = read_json(root / index).get("weight_map")
        if not isinstance(mapping, dict):
            raise WeightsError(f"{root / index}: has no 'weight_map' object")
        missing = sorted({f for f in mapping.values() if not (root / f).exists()})
        if missing:
            raise WeightsError(f"{root}: shard {missing[0]} listed in {index} is missing")
        return mapping
    if not root.is_dir():
        raise WeightsError(
            f"{root}: "
            + ("a file, where a checkpoint directory was expected" if root.exists() else "not found")
        )
    if single and (root / single).exists():
        with open_safetensors(root / single) as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    raise WeightsError(f"{root}: neither {index}" + (f" nor {single}" if single else "") + " found")


def shards_in_order(mapping: dict[str, str]) -> list[str]:
    return sorted(set(mapping.values()))


def iter_shard(root: Path, shard: str) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one shard, loaded one tensor at a time."""
    with open_safetensors(root / shard) as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            yield name, f.get_tensor(name)


def read_tensor(root: Path, shard: str, name: str) -> Tensor:
    with open_safetensors(root / shard) as f:
        return f.get_tensor(name)


def read_mcore_model(mcore_dir: Path) -> tuple[Model, dict]:
    meta = read_json(mcore_dir / MCORE_META)
    if meta.get("format") != FORMAT or "model" not in meta:
        raise WeightsError(
            f"{mcore_dir / MCORE_META}: not a megatron-core directory written by trainer.convert"
        )
    return Model.model_validate(meta["model"]), meta
