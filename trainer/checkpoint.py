"""Atomic, resumable checkpoints: `checkpoints/episode-NNNNNN/state.pt` plus a `latest` pointer.

A checkpoint is written into a temporary directory and renamed into place, and `latest` is replaced
atomically after it, so a kill -9 at any moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from trainer.atomic import write_bytes

KEEP = 2


def _dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(run_dir: Path, episode: int, state: dict) -> Path:
    root = _dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"episode-{episode:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_bytes(root / "latest", final.name.encode())
    older = sorted(p for p in root.glob("episode-*") if p != final)
    for old in older[: max(0, len(older) - (KEEP - 1))]:
        shutil.rmtree(old)
    return final


def latest(run_dir: Path) -> tuple[int, dict] | None:
    """(episode, state) of the newest complete checkpoint, or None."""
    pointer = _dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = _dir(run_dir) / pointer.read_text().strip() / "state.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["episode"], state
