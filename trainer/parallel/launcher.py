"""Start one process per device (per CPU "GPU") with torch's elastic launcher, and stop them all on a failure.

``launch(fn, world_size, *args)`` runs ``fn(*args)`` in ``world_size`` processes on this host with the
elastic agent (what ``torchrun --standalone`` uses): RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set per
process, a free rendezvous port, no restarts. When any rank fails, the agent stops every other rank
(SIGTERM, then SIGKILL) and the first failure is reported as one line. One process runs in-process.
A multi-node launcher (Ray placement groups) would replace this module and nothing else.
"""

from __future__ import annotations

import ctypes
import os
import signal
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

# Seconds between the agent's health checks of its workers: a dead rank is noticed within this.
MONITOR_INTERVAL = 0.5


class RankFailed(RuntimeError):
    """A rank of a multi-process run failed; the message names the rank and its first error."""


def _first_failure(exc) -> str:
    rank, failure = exc.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip().splitlines()
    reason = next((line for line in reversed(text) if line.strip() and not line.startswith(" ")), "")
    if failure.signal_name() != "<N/A>" and not reason.strip():
        reason = f"killed by {failure.signal_name()}"
    return f"rank {rank} failed (exit code {failure.exitcode}): {reason or 'see the log above'}"


def launch(fn: Callable[..., Any], world_size: int, *args: Any, stall_timeout_s: float | None = None) -> Any:
    """``fn(*args)`` on ``world_size`` local processes; returns rank 0's return value. With
    ``stall_timeout_s``, ranks that stop making progress (``trainer.heartbeat``) are stopped, the stuck one named."""
    if world_size == 1:
        return fn(*args)
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trainer.heartbeat import StallWatch
    from trainer.interrupts import AGENT_SIGNALS, forwarding

    # older torch (2.6.0, vLLM 0.8.5's) has no signals_to_handle: its agent turns SIGINT/SIGTERM into its own exception
    # there, so the ranks' checkpoint-and-stop on a signal holds only for newer torch
    signals = {"signals_to_handle": AGENT_SIGNALS} if "signals_to_handle" in LaunchConfig.__dataclass_fields__ else {}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=MONITOR_INTERVAL, start_method="spawn", **signals)
    # The agent logs each failure with a traceback of its own polling; the one line below says it all.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    watch = StallWatch(world_size, stall_timeout_s) if stall_timeout_s else nullcontext()
    try:
        with forwarding(), watch:
            results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        raise RankFailed(getattr(watch, "verdict", None) or _first_failure(exc)) from None
    return results[0]


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the launcher's agent) dies, so no rank outlives it."""
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
