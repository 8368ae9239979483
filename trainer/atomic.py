"""Writes that never leave a half-written file: write a sibling temp file, fsync, rename over the target.

Files get the mode the process umask gives (a team's run directory is readable by the team), not mkstemp's 0600.
A write that finds the disk full raises ``DiskFull``: one line naming the directory and the bytes it needed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


class DiskFull(Exception):
    """No space left where a run writes; the message names the directory, the bytes needed and those free."""

    def __init__(self, directory: Path, needed: int, what: str):
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            free = 0
        super().__init__(f"no space left on the device of {directory}: {what} needs about {_mb(needed)}, "
                         f"{_mb(free)} free; free some space there")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def is_disk_full(exc: BaseException) -> bool:
    """An OSError ENOSPC, or torch's serializer failing on a short write (it reports no errno), or either among
    the ranks' failures of a torch distributed checkpoint (its CheckpointException, a BaseException)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        return any(is_disk_full(failure) for failure, _trace in failures.values())
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and any(
        s in str(exc) for s in ("unexpected pos", "file write failed", "No space left"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFull(path.parent, len(data), f"writing {path.name}") from None
        raise


def write_json(path: Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
