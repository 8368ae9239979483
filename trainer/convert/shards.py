"""Sharded safetensors directories: reading the shard list and index, writing shards and an index atomically.

An HF checkpoint is ``config.json`` plus ``model.safetensors`` or ``model.safetensors.index.json`` with its
shards; a megatron-core directory written here is ``mcore.json`` plus ``mcore.safetensors.index.json`` with
its shards (tensors keyed by global megatron names, unsharded; the sharded form is ``trainer.convert.sharded``'s).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from trainer.convert import ConvertError

HF_SINGLE, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
MCORE_INDEX, MCORE_META = "mcore.safetensors.index.json", "mcore.json"


def read_json(path: Path) -> dict:
    """A JSON object file (config.json, an index, mcore.json); anything else is one ConvertError line."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except NotADirectoryError:
        raise ConvertError(f"{path.parent}: a file, where a checkpoint directory was expected") from None
    except IsADirectoryError:
        raise ConvertError(f"{path}: a directory, where a JSON file was expected") from None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 (byte {e.start}); JSON files are UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: a JSON {type(value).__name__}, where a JSON object {{...}} was expected")
    return value


@contextlib.contextmanager
def open_safetensors(path: Path):
    """``safe_open`` with a truncated, oversized or otherwise broken header as one ConvertError line."""
    try:
        f = safe_open(path, "pt")
    except IsADirectoryError:
        raise ConvertError(f"{path}: a directory, where a safetensors file was expected") from None
    except (SafetensorError, OSError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]}); "
                           "download or convert it again") from None
    with f:
        yield f


def weight_map(root: Path, *, index: str = HF_INDEX, single: str | None = HF_SINGLE) -> dict[str, str]:
    """tensor name → shard file of a checkpoint directory (index file, or the single-file form)."""
    if (root / index).exists():
        mapping = read_json(root / index).get("weight_map")
        if not isinstance(mapping, dict):
            raise ConvertError(f"{root / index}: has no 'weight_map' object")
        missing = sorted({f for f in mapping.values() if not (root / f).exists()})
        if missing:
            raise ConvertError(f"{root}: shard {missing[0]} listed in {index} is missing")
        return mapping
    if not root.is_dir():
        raise ConvertError(f"{root}: " + ("a file, where a checkpoint directory was expected" if root.exists()
                                          else "not found"))
    if single and (root / single).exists():
        with open_safetensors(root / single) as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    raise ConvertError(f"{root}: neither {index}" + (f" nor {single}" if single else "") + " found")


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


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """A temporary sibling directory that becomes ``target`` when the block succeeds (removed if not)."""
    target = target.resolve()
    if target.exists():
        raise ConvertError(f"{target}: already exists; choose a new output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_shard(path: Path, tensors: dict[str, Tensor]) -> int:
    """Write one shard (tmp file, then rename); returns its tensor bytes for the index's total_size."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_index(path: Path, mapping: dict[str, str], total_size: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": mapping}, indent=2) + "\n")
    os.replace(tmp, path)


def copy_side_files(src: Path, dst: Path) -> None:
    """Everything of a checkpoint directory but its weights and index (config, tokenizer, generation config)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != HF_INDEX:
            shutil.copy2(f, dst / f.name)
