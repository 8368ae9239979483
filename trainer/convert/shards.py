"""Writing weights directories: a temporary sibling renamed into place, shards and an index each atomically.

What the directories hold and how they are read is ``trainer.models.weight_files`` (runs read them too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from trainer.convert import ConvertError
from trainer.models.weight_files import HF_INDEX


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
