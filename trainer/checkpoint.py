"""Atomic, resumable checkpoints: `checkpoints/episode-NNNNNN/` plus a `latest` pointer.

An episode directory holds one `rank-RRRRR.pt` per rank (the loop's state and each model's per-rank state) and,
per model, a subdirectory (`policy/`, `reference/`) in the format its backend chose: the FSDP2 backend writes a
torch distributed checkpoint there, the megatron-core backend keeps everything in the rank files.

Every rank writes into one temporary directory that the driver made; once all have written, the driver
writes `manifest.json` (every file's size and sha256) last, renames the directory into place and replaces
`latest` atomically, so a kill -9 at any moment leaves the previous checkpoint intact and loadable. A checkpoint
without a manifest, or whose files no longer match it (truncated, emptied), is skipped on resume with the reason,
for the newest one that is complete. A checkpoint is resumed by the same number of ranks that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch.distributed.checkpoint.api import CheckpointException

from trainer.atomic import DiskFull, is_disk_full, write_bytes, write_json
from trainer.parallel.job import Job
from trainer.platform import HOST

KEEP = 2
MANIFEST = "manifest.json"
EPISODE = re.compile(r"episode-(\d{6})")


class IncompleteCheckpoint(Exception):
    """A checkpoint directory that cannot be resumed from; the message says why."""


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
    part, full = _rank_file(tmp, job.rank), None
    try:
        state = state | {name: model.save(tmp / name) if model is not None else None
                         for name, model in (models or {}).items()}
        torch.save(state, part.with_suffix(".partial"))
    except (OSError, RuntimeError, CheckpointException) as exc:  # DCP (FSDP2) raises CheckpointException
        if not is_disk_full(exc):
            raise
        full = DiskFull(root, _nbytes(state), f"the checkpoint of episode {episode} (this rank's part)")
    # The folder goes only once every rank has stopped writing into it: removed while another rank still wrote,
    # that rank failed on the missing folder, and its error could be the one the run reported.
    if job.max(int(full is not None)):
        if full is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays `latest`
            raise full
        job.barrier()  # the ranks that had space wait here until the run stops with the full rank's line
    part.with_suffix(".partial").rename(part)
    job.barrier()
    files = _describe(tmp, job)

    def publish() -> None:
        write_json(tmp / MANIFEST, {"episode": episode, "files": files})
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


def _nbytes(state: object) -> int:
    """Bytes of the tensors in ``state``: what its file will need, about."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, Mapping):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_nbytes(v) for v in state)
    return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(directory: Path, job: Job) -> dict[str, dict]:
    """Size and sha256 of every file of the checkpoint in ``directory``, the hashing shared out among the ranks
    (one host alone would take minutes over a 7B model's files while the others wait). Collective."""
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]
    mine = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files[job.rank::job.world_size]}
    return dict(sorted(item for part in job.gather(mine) for item in part.items()))


def check(directory: Path, *, hashes: bool = False) -> dict:
    """The manifest of the checkpoint in ``directory``; raises IncompleteCheckpoint naming the first file that
    is missing or differs from it (sizes always, contents too with ``hashes``)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"no {MANIFEST} (its save did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncompleteCheckpoint(f"its {MANIFEST} is unreadable ({exc})") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise IncompleteCheckpoint(f"{name} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IncompleteCheckpoint(f"{name} has {size} bytes, its manifest says {expected['bytes']}")
        if hashes and _sha256(path) != expected["sha256"]:
            raise IncompleteCheckpoint(f"{name} differs from its manifest's sha256")
    return manifest


def episodes(run_dir: Path) -> Iterator[tuple[int, Path]]:
    """(episode, directory) of every published checkpoint directory, newest first, complete or not."""
    root = _dir(run_dir)
    found = [(int(m.group(1)), p) for p in root.glob("episode-*") if (m := EPISODE.fullmatch(p.name)) and p.is_dir()]
    return iter(sorted(found, reverse=True))


def latest_episode(run_dir: Path) -> tuple[int, Path] | None:
    """(episode, directory) of the newest complete checkpoint (sizes checked against its manifest), or None:
    the one `latest` names when it is complete, else the newest complete one."""
    pointer = _dir(run_dir) / "latest"
    try:
        named = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    candidates = list(episodes(run_dir))
    candidates.sort(key=lambda pair: pair[1].name != named)  # the named one first, then newest first
    for episode, directory in candidates:
        try:
            check(directory)
        except IncompleteCheckpoint:
            continue
        return episode, directory
    return None


def recover(run_dir: Path) -> list[str]:
    """Before a resume (the driver, alone): clear what an interrupted save left (a temporary directory, partial
    files), verify checkpoints newest first against their manifests (contents too), and point `latest` at the
    newest complete one. Returns one line per checkpoint skipped, with the reason."""
    root = _dir(run_dir)
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    skipped = []
    for _, directory in episodes(run_dir):
        try:
            check(directory, hashes=True)
        except IncompleteCheckpoint as exc:
            skipped.append(f"skipped checkpoint {directory}: {exc}")
            continue
        pointer = root / "latest"
        if not pointer.is_file() or pointer.read_bytes() != directory.name.encode():
            write_bytes(pointer, directory.name.encode())
        return skipped
    (root / "latest").unlink(missing_ok=True)  # nothing complete: the run starts over
    return skipped


def ranks_in(directory: Path) -> int:
    return len([name for name in check(directory)["files"] if re.fullmatch(r"rank-\d{5}\.pt", name)])


def read(directory: Path, rank: int = 0) -> dict:
    """This rank's file of the checkpoint in ``directory``."""
    # mapped, not read: the tensors are copied into the models from the file's pages, not from a second copy
    return torch.load(_rank_file(directory, rank), map_location=HOST, weights_only=False, mmap=True)


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
