"""What each rank of a run executes: process groups from the layout, backends, engine, log, then the loop.

This is the entry point that owns ranks (DESIGN §4): it reads its rank from the launcher, chooses the
platform (``trainer.platform``: the rank's device, collective backend, dtypes, spec provider) from
``run.device`` and what the process sees, builds the ``ParallelLayout`` and the process groups once, decides
that the driver (rank 0) hosts the rollout engine and writes run files, and hands a ``Job`` down. Nothing
below it creates groups, asks for ranks or names a device.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from matrix import ResolvedRecipe

ROOT = Path(__file__).resolve().parent.parent
# Test hook (never set by users): "path/to/faults.py:name" is called in every rank before training, so the
# equivalence tests can plant a fault in a candidate layout and show that the gate catches it.
FAULT_ENV = "GRPO_STACK_PLANT_FAULT"


@dataclass(frozen=True)
class RunRequest:
    resolved: ResolvedRecipe
    run_dir: Path
    resume: bool = False
    tensorboard: bool = False
    wandb_project: str | None = None
    mllog: bool = False
    initial: dict | None = None  # whole HF-named weights (multi-process runs start from the same init)
    weights: Path | None = None  # a pretrained directory, checked (trainer.models.pretrained); each rank reads its part


def plant_fault_if_asked() -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("planted_faults", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    getattr(module, name)()


def start_rank() -> tuple[int, int]:
    """Per-process set-up: rank, threads, parent-death signal, quiet megatron, planted fault (tests)."""
    from trainer import interrupts
    from trainer.parallel.launcher import die_with_parent, rank_and_world

    rank, world = rank_and_world()
    interrupts.install(world)
    if world > 1:
        die_with_parent()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # megatron-core warns at import that TE/apex are absent: expected on CPU, and noise in every run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    plant_fault_if_asked()
    return rank, world


def one_process(resolved: ResolvedRecipe) -> ResolvedRecipe:
    """The recipe on one process: every degree 1, the same trainer (an FSDP layout stays FSDP, on one rank)."""
    from matrix.schema import Layout

    return resolved.model_copy(update={"layout": Layout(fsdp=resolved.layout.fsdp), "min_gpus": 1, "dp": 1,
                                       "recipe": resolved.recipe.model_copy(update={"gpus": 1})})


def initial_weights(resolved: ResolvedRecipe) -> dict[str, torch.Tensor]:
    """Whole HF-named weights of the one-process initialisation of ``resolved``'s model at its seed, so that
    every layout starts from the same model (megatron draws per-stage weights differently under PP / EP)."""
    from trainer.backends.base import build_backend
    from trainer.parallel.process_groups import process_groups

    single = one_process(resolved)
    with process_groups(single.layout):
        return dict(build_backend(single, seed=single.recipe.run.seed, trainable=False).hf_named_tensors())


@record
def run_rank(request: RunRequest) -> dict:
    """Train ``request`` as this rank; returns {"status": "finished"|"stopped"|"interrupted", ...} (the
    driver's matters)."""
    rank, world = start_rank()
    from trainer.backends.base import build_backend
    from trainer.heartbeat import stall_timeout_s
    from trainer.interrupts import RunInterrupted
    from trainer.loop import RunStopped, train
    from trainer.metrics import DiscardLog, MetricsLog
    from trainer.parallel.job import Job
    from trainer.parallel.layout import ParallelLayout
    from trainer.parallel.process_groups import destroy_process_groups, init_process_groups
    from trainer.passes import passes
    from trainer.platform import choose_platform
    from trainer.rollout.base import EngineError
    from trainer.rollout.factory import build_engine
    from trainer.tasks import build_task

    r, engine = request.resolved, None
    platform = choose_platform(r.recipe.run.device)
    job = Job(ParallelLayout.of(r.layout, world), rank, platform)
    # a collective waits a little longer than the launcher's stall watch (trainer.heartbeat), which names the rank
    init_process_groups(r.layout, rank=rank, world_size=world, platform=platform, timeout_s=stall_timeout_s(r) + 60)
    log = (MetricsLog(request.run_dir, tensorboard=request.tensorboard, wandb_project=request.wandb_project,
                      config=r.model_dump(mode="json"), mllog=request.mllog) if job.is_driver else DiscardLog())
    try:
        platform.seed(r.recipe.run.seed)
        task = build_task(r, root=ROOT)
        start = {"initial": request.initial, "weights": request.weights, "platform": platform}
        policy = build_backend(r, seed=r.recipe.run.seed, **start)
        # no reference model when nothing reads it (kl_coef 0, no log_reference_kl): its weights' memory saved
        ref = build_backend(r, seed=r.recipe.run.seed, trainable=False, **start) if passes(r).reference else None
        # off-policy pipelining: the weights that generate the batch in flight (trainer.pipeline)
        behaviour = build_backend(r, seed=r.recipe.run.seed, trainable=False, **start) if passes(r).behaviour else None
        try:
            engine = job.on_driver(lambda: build_engine(r, task))
            summary = train(r, request.run_dir, task=task, policy=policy, ref=ref, engine=engine, log=log, job=job,
                            resume=request.resume, behaviour=behaviour)
        except (RunStopped, EngineError) as exc:
            if isinstance(exc, EngineError) and world > 1:
                raise  # the launcher stops every rank (they wait in a collective) and reports this one line
            if getattr(log, "mllog", None):
                log.mllog.close("aborted")
            log.write_summary({"recipe": r.name, "run_dir": str(request.run_dir), "status": f"stopped: {exc}"})
            return {"status": "stopped", "message": str(exc)}
        except RunInterrupted as exc:
            log.write_summary({"recipe": r.name, "run_dir": str(request.run_dir), "status": str(exc)})
            return {"status": "interrupted", "episode": exc.episode, "signal": exc.signum}
        return {"status": "finished", "summary": summary}
    finally:
        if engine is not None:
            engine.shutdown()  # no engine process outlives its run
        log.close()
        destroy_process_groups()
