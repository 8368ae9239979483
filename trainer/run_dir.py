"""The run directory as the CLI hands it to the ranks: one trainer at a time, a place it can write, and on
``--resume`` the recipe and overrides the run was started with.

A run holds ``RUN/.lock`` (``fcntl.flock``) from before its first write to its exit, so a scheduler that
restarts a job whose old copy still runs gets one line, not two trainers interleaving one run. The kernel drops
the lock with the process, so a killed run never leaves a stale one.

``RUN/config.json`` is the run's truth on resume: its recipe and overrides are resolved again, and the result
must equal the resolved recipe it recorded in everything but ``run.episodes`` (a longer or shorter run), so an
override given again, a changed matrix or another recipe is refused naming both values instead of being
dropped or trained on silently.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from trainer.atomic import write_json
from trainer.config import TrainerInputError

LOCK = ".lock"
CONFIG = "config.json"
# What may differ between a run and its resume: everything else is the run's. A resumed run starts from its
# checkpoint, never from the pretrained weights it was initialised with, so those may have moved since.
MAY_DIFFER = {("recipe", "run", "episodes"), ("model", "weights")}


class RunLock:
    """``flock`` on RUN/.lock for as long as this object lives (the CLI's process, the whole run)."""

    def __init__(self, run_dir: Path):
        path = run_dir / LOCK
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TrainerInputError(unwritable(run_dir, exc)) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise TrainerInputError(f"{run_dir} is in use by another trainer (pid {holder}); wait for it to end or "
                                    "stop it before starting another run there") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def unwritable(path: Path, exc: OSError) -> str:
    reason = {errno.EROFS: "a read-only file system", errno.EACCES: "not writable by this user",
              errno.ENOTDIR: "not a directory", errno.ENOSPC: "a full disk", errno.EPERM: "not writable by this user",
              }.get(exc.errno, exc.strerror or str(exc))
    return f"run directory {path}: cannot write there ({reason}); pick a writable directory (--runs or --run-dir)"


def make_dir(path: Path, flag: str) -> None:
    """``mkdir -p`` of a run directory or its parent, refusing a file, a device or an unwritable place in one
    line (checked by writing a probe, since a root user's access() says yes to a read-only mount)."""
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise TrainerInputError(f"{flag} {path}: {parent} is not a directory; pick a directory path")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainerInputError(f"{flag} {path}: " + unwritable(path, exc).split(": ", 1)[1]) from None


@dataclass(frozen=True)
class SavedRun:
    recipe: str
    overrides: list[str]
    rehearse: bool
    resolved: dict


def saved_run(run_dir: Path) -> SavedRun:
    """The run's RUN/config.json, or one line saying what is wrong with it."""
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise TrainerInputError(f"--resume {run_dir}: no such run directory")
    try:
        data = json.loads(path.read_text())
        saved = SavedRun(recipe=data["recipe"], overrides=list(data["overrides"]), rehearse=bool(data["rehearse"]),
                         resolved=data["resolved"])
        if not isinstance(saved.recipe, str) or not isinstance(saved.resolved, dict) or not all(
                isinstance(o, str) for o in saved.overrides):
            raise TypeError("unexpected types")
    except FileNotFoundError:
        raise TrainerInputError(f"--resume {run_dir}: no {CONFIG} there, so it holds no run; start one with "
                                f"--run-dir {run_dir}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainerInputError(f"--resume {path}: not a run's config ({type(exc).__name__}: {exc}); the run "
                                "cannot be resumed from it") from None
    return saved


def resume_arguments(run_dir: Path, saved: SavedRun, recipe: str | None, overrides: list[str]) -> list[str]:
    """The overrides to resolve the resumed run with: the run's, then the command line's (checked later by
    ``check_same``). A recipe named on the command line must be the run's."""
    if recipe is not None and recipe != saved.recipe:
        raise TrainerInputError(f"--resume {run_dir}: the run is recipe {saved.recipe}, not {recipe}; resume it "
                                f"with --resume {run_dir} and no recipe (or {saved.recipe})")
    return saved.overrides + overrides


def _flat(tree: object, prefix: tuple = ()) -> dict[tuple, object]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, (*prefix, key)).items()} or {prefix: {}}
    return {prefix: tree}


def check_same(run_dir: Path, saved: SavedRun, resolved: dict) -> None:
    """The resumed run's resolved recipe is the run's, but for ``run.episodes``; else one line naming both."""
    before, now = _flat(saved.resolved), _flat(resolved)
    for key in sorted(before, key=str):  # a field added since the run started has its default: not compared
        if key not in MAY_DIFFER and before[key] != now.get(key, "(absent)"):
            name = ".".join(map(str, key[1:] if key[0] == "recipe" else key))
            raise TrainerInputError(f"--resume {run_dir}: {name} is {before[key]!r} in the run "
                                    f"({run_dir / CONFIG}) but {now.get(key, '(absent)')!r} here; only "
                                    "run.episodes may change on resume")


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(root: Path, argv: list[str]) -> dict:
    """What produced this session of a run: the command, the code's git revision and whether it had local
    changes, the image's fingerprint (None outside an image) and the versions of the libraries that compute."""
    from images.fingerprint import FINGERPRINT_NAME, IMAGE_DIR

    fingerprint = IMAGE_DIR / FINGERPRINT_NAME
    versions = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "transformers", "vllm", "sglang", "transformer-engine", "flash-attn"):
        with suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv, "git_revision": _git(root, "rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status), "host": platform.node(),
            "image_fingerprint": hashlib.sha256(fingerprint.read_bytes()).hexdigest() if fingerprint.is_file() else None,
            "versions": versions}


def record_session(run_dir: Path, root: Path, argv: list[str]) -> None:
    """Append this session (a start or a resume) to RUN/provenance.json."""
    path = run_dir / "provenance.json"
    try:
        sessions = json.loads(path.read_text())["sessions"]
    except (OSError, ValueError, KeyError, TypeError):
        sessions = []
    write_json(path, {"sessions": [*sessions, provenance(root, argv)]})


def check_shared(run_dir: Path, job) -> None:
    """Every rank sees the run directory as the driver writes it: each rank writes its checkpoint part into the
    driver's folder there and reads its own back on resume, so the nodes of a multi-node run must share it (one
    filesystem, mounted at the same path). Checked before anything is trained: the driver leaves a marker that
    every rank looks for; a rank that cannot see it stops the run with one line naming it and its host. Collective."""
    if job.world_size == 1:
        return
    marker = run_dir / f".shared-check-{job.broadcast(job.on_driver(lambda: os.urandom(8).hex()))}"
    job.on_driver(lambda: write_json(marker, {}))
    job.barrier()
    views = job.gather((marker.exists(), platform.node()))
    job.barrier()
    job.on_driver(lambda: marker.unlink(missing_ok=True))
    blind = [(rank, host) for rank, (sees, host) in enumerate(views) if not sees]
    if blind:
        rank, host = blind[0]
        raise TrainerInputError(
            f"the run directory {run_dir} that rank 0 writes (on {views[0][1]}) is not there for rank {rank} on "
            f"{host} ({len(blind)} rank(s) in all): the nodes of a run must share it; put --run-dir on a "
            "filesystem every node mounts at the same path"
        )
