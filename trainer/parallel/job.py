"""Who this process is in the job, made once by the entry point and handed down.

The loop asks this object, never torch.distributed, where work happens: the driver (global rank 0) hosts
the rollout engine, writes run files and logs; ``broadcast`` hands what the driver made to every rank;
``platform`` is the device this rank computes on (``trainer.platform``, chosen by the entry point).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from matrix.layout import ParallelLayout
from trainer.platform import CPU, Platform

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    layout: ParallelLayout
    rank: int = 0
    platform: Platform = CPU

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def on_driver(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on the driver; None on the other ranks (no communication)."""
        return fn() if self.is_driver else None

    def broadcast(self, obj: Any) -> Any:
        """The driver's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def max(self, value: int) -> int:
        """The largest of every rank's ``value`` (ranks agree on one decision, e.g. to stop)."""
        if self.world_size == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
