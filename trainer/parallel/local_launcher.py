"""The local launcher: one process per rank on this host with torch's elastic agent (``torchrun --standalone``).

A free rendezvous port, no restarts; when any rank fails the agent stops every other rank (SIGTERM, then SIGKILL)
and the first failure is reported as one line. Ranks start as forks of a fork server that has imported what ranks
import (``trainer.parallel.fork_server``); each dies with it (``die_with_parent``), and it with the driver.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from trainer.parallel import fork_server
from trainer.parallel.ranks import RankFailed, die_with_parent

# Seconds between the agent's health checks of its workers: a dead rank is noticed within this.
MONITOR_INTERVAL = 0.5


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


# Imported by the fork server beside each rank's entry module, only where torch is a CPU build: a library that
# reached CUDA at import would leave every forked rank unable to use a GPU, and Transformer Engine (which
# megatron-core imports where it is installed) cannot be checked here.
CPU_TORCH_RANK_IMPORTS = ("megatron.core", "transformers", "trainer.backends.megatron", "trainer.backends.fsdp",
                          "trainer.loop")


def rank_imports(fn: Callable[..., Any]) -> list[str]:
    """What the fork server imports before the ranks of ``fn`` are forked from it."""
    import torch

    cpu_torch = not torch.backends.cuda.is_built()
    return ["torch", fn.__module__, *(CPU_TORCH_RANK_IMPORTS if cpu_torch else ())]


def _agent_rank(fn: Callable[..., Any], *args: Any) -> Any:
    """A rank under the agent: dies with it, and its error is recorded for the agent's first-failure report."""
    from torch.distributed.elastic.multiprocessing.errors import record

    fork_server.in_rank()
    die_with_parent()
    try:
        return record(fn)(*args)
    except Exception:
        # A forked rank exits at once (no interpreter teardown), so a rank whose collective failed because a peer
        # died is often seen in the same health check as that peer, and the agent then names the lower rank. Two
        # checks' wait lets the rank that failed first be named; raising ranks keep their order.
        time.sleep(2 * MONITOR_INTERVAL)
        raise


class ElasticLauncher:
    def launch(self, fn: Callable[..., Any], world_size: int, *args: Any, ranks_per_node: int | None = None,
               stall_timeout_s: float | None = None) -> Any:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        from trainer.heartbeat import StallWatch
        from trainer.interrupts import AGENT_SIGNALS, forwarding

        # older torch (2.6.0, vLLM 0.8.5's) has no signals_to_handle: its agent turns SIGINT/SIGTERM into its own
        # exception there, so the ranks' checkpoint-and-stop on a signal holds only for newer torch
        fields = LaunchConfig.__dataclass_fields__
        signals = {"signals_to_handle": AGENT_SIGNALS} if "signals_to_handle" in fields else {}
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                              monitor_interval=MONITOR_INTERVAL, start_method="forkserver", **signals)
        # The agent logs each failure with a traceback of its own polling; the one line below says it all.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        watch = StallWatch(world_size, stall_timeout_s) if stall_timeout_s else nullcontext()
        try:
            with forwarding(), watch:
                fork_server.start(rank_imports(fn))  # after the watch has set the ranks' heartbeat folder
                try:
                    results = elastic_launch(config, _agent_rank)(fn, *args)
                finally:
                    fork_server.stop()
        except ChildFailedError as exc:
            raise RankFailed(getattr(watch, "verdict", None) or _first_failure(exc)) from None
        return results[0]
