"""Atomic, resumable checkpoints: `checkpoints/episode-NNNNNN/` plus a `latest` pointer.

An episode directory holds one `rank-RRRRR.pt` per rank (the loop's state and each model's per-rank state) and,
per model, a subdirectory (`policy/`, `reference/`) in the format its backend chose: the FSDP2 backend writes a
torch distributed checkpoint there, the megatron-core backend keeps everything in the rank files.

Every rank writes into one temporary directory that the driver made; once all have written, the driver
renames it into place and replaces `latest` atomically, so a kill -9 at any moment leaves the previous
checkpoint intact and loadable. A checkpoint is resumed by the same number of ranks that wrote it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from trainer.atomic import write_bytes
from trainer.parallel.job import Job
from trainer.platform import HOST

KEEP = 2


class Checkpointable(Protocol):
    """A model with its own checkpoint format (a training backend): ``save`` writes under ``directory`` and
    returns this rank's part for its rank file, ``load`` takes both back. Both are collective."""

    def save(self, directory: Path) -> dict: ...

    def load(self, directory: Path, own: dict) -> None: ...


def _dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.pt"


def save(run_dir: Path, episode: int, state: dict, job: Job,
         models: Mapping[str, Checkpointable | None] | None = None) -> Path:
    """Checkpoint ``episode``: ``state`` (the same on every rank) and each of ``models`` under its name (None for
    a model the run does not have) into every rank file. Collective."""
    root = _dir(run_dir)
    final = root / f"episode-{episode:06d}"
    tmp = root / f".tmp-episode-{episode:06d}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    job.on_driver(prepare)
    job.barrier()
    state = state | {name: model.save(tmp / name) if model is not None else None
                     for name, model in (models or {}).items()}
    part = _rank_file(tmp, job.rank)
    torch.save(state, part.with_suffix(".partial"))
    part.with_suffix(".partial").rename(part)
    job.barrier()

    def publish() -> None:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_bytes(root / "latest", final.name.encode())
        older = sorted(p for p in root.glob("episode-*") if p != final)
        for old in older[: max(0, len(older) - (KEEP - 1))]:
            shutil.rmtree(old)

    job.on_driver(publish)
    job.barrier()
    return final


def latest_episode(run_dir: Path) -> tuple[int, Path] | None:
    """(episode, directory) of the newest complete checkpoint, or None."""
    pointer = _dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    directory = _dir(run_dir) / pointer.read_text().strip()
    return int(directory.name.split("-")[1]), directory


def ranks_in(directory: Path) -> int:
    return len(list(directory.glob("rank-*.pt")))


def read(directory: Path, rank: int = 0) -> dict:
    """This rank's file of the checkpoint in ``directory``."""
    return torch.load(_rank_file(directory, rank), map_location=HOST, weights_only=False)


def restore(directory: Path, state: dict, models: Mapping[str, Checkpointable | None]) -> None:
    """Load each of ``models`` (None: skipped) from the checkpoint in ``directory`` whose rank file is ``state``."""
    for name, model in models.items():
        if model is not None:
            model.load(directory / name, state[name])


def latest(run_dir: Path, rank: int = 0) -> tuple[int, dict] | None:
    """(episode, this rank's state) of the newest complete checkpoint, or None."""
    found = latest_episode(run_dir)
    if found is None:
        return None
    episode, directory = found
    return episode, read(directory, rank)
