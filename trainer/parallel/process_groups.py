"""torch.distributed and megatron ``parallel_state`` set-up and tear-down for one layout.

Each process of a run calls ``init_process_groups`` once, at its entry point, with its rank, the world size
and its platform: the rank's device bound first, the default group on the platform's collective backend,
megatron's model-parallel groups from the layout's degrees, and for an FSDP layout the device meshes the
FSDP2 backend shards over (``fsdp_meshes``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from megatron.core import parallel_state

from matrix.schema import Layout
from trainer.platform import CPU, Platform


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT of a single-process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _degrees(layout: Layout) -> tuple[int, ...]:
    return (layout.tp, layout.pp, layout.cp, layout.ep, layout.expert_tp)


def _degrees_now() -> tuple[int, ...]:
    ps = parallel_state
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )


@dataclass(frozen=True)
class FSDPMeshes:
    """FSDP2 shards parameters over ``shard`` (every rank); a Ulysses group is ``sp`` consecutive ranks
    (the ``sp`` dimension of ``dp_sp``), and rows of the batch are split over ``dp``."""

    shard: object  # DeviceMesh (1-D, all ranks)
    dp_sp: object  # DeviceMesh (dp, sp)

    @property
    def sp_group(self):
        return self.dp_sp.get_group("sp")

    @property
    def dp_size(self) -> int:
        return self.dp_sp.size(0)

    @property
    def dp_rank(self) -> int:
        return self.dp_sp.get_local_rank("dp")


_FSDP: FSDPMeshes | None = None


def fsdp_meshes() -> FSDPMeshes:
    if _FSDP is None:
        raise RuntimeError("no FSDP layout's process groups: init_process_groups(layout with fsdp: true) first")
    return _FSDP


def _init_fsdp_meshes(layout: Layout, device_type: str) -> None:
    global _FSDP
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % layout.ulysses:
        raise ValueError(f"world size {world} is not a multiple of ulysses={layout.ulysses}")
    _FSDP = FSDPMeshes(shard=init_device_mesh(device_type, (world,), mesh_dim_names=("shard",)),
                       dp_sp=init_device_mesh(device_type, (world // layout.ulysses, layout.ulysses),
                                              mesh_dim_names=("dp", "sp")))


def init_process_groups(layout: Layout, *, rank: int = 0, world_size: int = 1, platform: Platform = CPU,
                        timeout_s: float | None = None) -> None:
    """Bind the platform's device, then initialise the default group on its collective backend and megatron's
    model-parallel groups with the layout's degrees (the CPU platform when none is given: tests and tools);
    ``timeout_s`` bounds a collective's wait (torch's default is 30 minutes).

    Idempotent for the process: an existing default group is reused (its world size must match), and
    megatron's groups are kept when their degrees already match the layout.
    """
    platform.install()
    platform.bind()  # before any group: NCCL communicators attach to the current device
    if not dist.is_initialized():
        backend = platform.collective_backend
        if world_size == 1:
            # An in-memory store: no port to collide with another run, and no MASTER_PORT written into
            # os.environ for child processes to inherit while this process still holds it.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"] = str(free_port())
            timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
            dist.init_process_group(backend, rank=rank, world_size=world_size, **timeout)
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"torch.distributed already has world size {dist.get_world_size()}, "
            f"this layout asks for {world_size}"
        )
    if layout.fsdp and (_FSDP is None or _FSDP.dp_sp.size(1) != layout.ulysses):
        _init_fsdp_meshes(layout, platform.mesh_device_type)
    if parallel_state.model_parallel_is_initialized():
        if _degrees_now() == _degrees(layout):
            return  # a second backend in the process (policy + reference) shares the groups
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        **({"distributed_timeout_minutes": max(1, round(timeout_s / 60))} if timeout_s else {}),
    )


def destroy_process_groups() -> None:
    """Undo ``init_process_groups`` so another layout (or test) can start in the same process."""
    global _FSDP
    _FSDP = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_groups(layout: Layout | None = None, platform: Platform = CPU) -> Iterator[None]:
    """``init_process_groups`` for a block, torn down afterwards (tests, one-off conversions)."""
    init_process_groups(layout or Layout(), platform=platform)
    try:
        yield
    finally:
        destroy_process_groups()
