"""What every rank does first and last, whatever it runs (training, a gate's replay, a conversion) and whichever
launcher started it: ``with rank_session(layout, platform) as me:``.

First: rank and world from the launcher's environment, signal handlers (``trainer.interrupts``), CPU threads
shared among the host's ranks, megatron's import warnings quieted, a planted fault when a test asks
(``FAULT_ENV``), then the process groups of the layout on the platform's backend (which installs the platform's
compat layer and binds the device), and the seed when given. Last: the process groups torn down.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from matrix.schema import Layout
from trainer.platform import CPU, Platform

# Test hook (never set by users): "path/to/faults.py:name" is called in every rank before training, so the
# equivalence tests can plant a fault in a candidate layout and show that the gate catches it.
FAULT_ENV = "GRPO_STACK_PLANT_FAULT"


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    platform: Platform


def plant_fault_if_asked() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("planted_faults", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    getattr(module, name)()


def start_process() -> tuple[int, int]:
    """The process-wide part of a rank's set-up (no process groups): rank, world, signals, threads, warnings, fault."""
    import torch

    from trainer import interrupts
    from trainer.parallel.ranks import rank_and_world

    rank, world = rank_and_world()
    interrupts.install(world)
    # the ranks of one host share its cores, unless OMP_NUM_THREADS says how many each takes (it is passed to every
    # rank, Ray's too: on some CPUs the host's kernels round differently with another thread count)
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    # megatron-core warns at import that TE/apex are absent: expected on CPU, and noise in every run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    plant_fault_if_asked()
    return rank, world


@contextlib.contextmanager
def rank_session(layout: Layout, platform: Platform = CPU, *, seed: int | None = None,
                 timeout_s: float | None = None) -> Iterator[Rank]:
    """This rank set up for ``layout`` on ``platform`` for the block (``timeout_s``: a collective's longest wait),
    its process groups destroyed after it, whatever happens."""
    rank, world = start_process()  # first: it quiets megatron's import warnings
    from trainer.parallel.process_groups import destroy_process_groups, init_process_groups

    try:
        init_process_groups(layout, rank=rank, world_size=world, platform=platform, timeout_s=timeout_s)
        if seed is not None:
            platform.seed(seed)
        yield Rank(rank, world, platform)
    finally:
        destroy_process_groups()
