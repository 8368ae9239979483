"""What each rank of a run executes: process groups from the layout, backends, engine, log, then the loop.

This is the entry point that owns ranks (DESIGN §4): it reads its rank from the launcher, chooses the
platform (``trainer.platform``: the rank's device, collective backend, dtypes, spec provider) from
``run.device`` and what the process sees, builds the ``ParallelLayout`` and the process groups once, decides
that the driver (rank 0) hosts the rollout engine and writes run files, and hands a ``Job`` down. Nothing
below it creates groups, asks for ranks or names a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from matrix import ResolvedRecipe

ROOT = Path(__file__).resolve().parent.parent


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


def run_rank(request: RunRequest) -> dict:
    """Train ``request`` as this rank; returns {"status": "finished"|"stopped"|"interrupted", ...} (the
    driver's matters)."""
    from trainer.heartbeat import stall_timeout_s
    from trainer.parallel.rank import rank_session
    from trainer.platform import choose_platform

    r = request.resolved
    # a collective waits a little longer than the launcher's stall watch (trainer.heartbeat), which names the rank
    with rank_session(r.layout, choose_platform(r.device), seed=r.recipe.run.seed,
                      timeout_s=stall_timeout_s(r) + 60) as me:
        return _train_rank(request, me)


def _train_rank(request: RunRequest, me) -> dict:
    from matrix.layout import ParallelLayout
    from trainer.backends.base import build_backend
    from trainer.interrupts import RunInterrupted
    from trainer.loop import RunStopped, train
    from trainer.metrics import DiscardLog, MetricsLog
    from trainer.parallel.job import Job
    from trainer.passes import passes
    from trainer.rollout.base import EngineError
    from trainer.rollout.factory import build_engine
    from trainer.run_dir import check_shared
    from trainer.tasks import build_task

    r, engine, platform = request.resolved, None, me.platform
    job = Job(ParallelLayout.of(r.layout, me.world), me.rank, platform)
    check_shared(request.run_dir, job)
    log = (MetricsLog(request.run_dir, tensorboard=request.tensorboard, wandb_project=request.wandb_project,
                      config=r.model_dump(mode="json"), mllog=request.mllog) if job.is_driver else DiscardLog())
    try:
        task = build_task(r, root=ROOT)
        start = {"initial": request.initial, "weights": request.weights, "platform": platform}
        policy = build_backend(r, seed=r.recipe.run.seed, **start)
        # no reference model when nothing reads it (kl_coef 0, no log_reference_kl): its weights' memory saved
        ref = build_backend(r, seed=r.recipe.run.seed, trainable=False, **start) if passes(r).reference else None
        # off-policy pipelining: the weights that generate the batch in flight (trainer.pipeline)
        behaviour = build_backend(r, seed=r.recipe.run.seed, trainable=False, **start) if passes(r).behaviour else None
        try:
            engine = job.on_driver(lambda: build_engine(r, task, platform))
            # an engine sizes its share of each of its GPUs from what they hold as it starts (colocated, other
            # ranks' GPUs too): nothing more is allocated on them until it has
            job.barrier()
            summary = train(r, request.run_dir, task=task, policy=policy, ref=ref, engine=engine, log=log, job=job,
                            resume=request.resume, behaviour=behaviour)
        except (RunStopped, EngineError) as exc:
            if isinstance(exc, EngineError) and me.world > 1:
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
