"""Atomic, resumable per-rank checkpoints: `checkpoints/episode-NNNNNN/rank-RRRRR.pt` plus a `latest` pointer.

Every rank writes its own state into one temporary directory that the driver made; once all have written,
the driver renames it into place and replaces `latest` atomically, so a kill -9 at any moment leaves the
previous checkpoint intact and loadable. A checkpoint holds one file per rank and is resumed by the same
number of ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from trainer.atomic import write_bytes
from trainer.parallel.job import Job

KEEP = 2


def _dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.pt"


def save(run_dir: Path, episode: int, state: dict, job: Job) -> Path:
    root = _dir(run_dir)
    final = root / f"episode-{episode:06d}"
    tmp = root / f".tmp-episode-{episode:06d}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    job.on_driver(prepare)
    job.barrier()
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


def latest(run_dir: Path, rank: int = 0) -> tuple[int, dict] | None:
    """(episode, this rank's state) of the newest complete checkpoint, or None."""
    found = latest_episode(run_dir)
    if found is None:
        return None
    episode, directory = found
    return episode, torch.load(_rank_file(directory, rank), map_location="cpu", weights_only=False)
