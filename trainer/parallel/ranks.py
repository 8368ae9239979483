"""What a rank process knows of its launch, shared by the launcher seam and every launcher: its rank, the failure
type a launcher raises, and dying with the parent that started it."""

from __future__ import annotations

import ctypes
import os
import signal


class RankFailed(RuntimeError):
    """A rank of a multi-process run failed; the message names the rank and its first error."""


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the local launcher's fork server, the driver of an engine)
    dies, so no child outlives it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the world size, as the launcher set them (0, 1 in-process)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
