"""The GRPO loop: one episode per iteration, phases in order, every phase timed.

episode = rollout → reward → advantages → old log-probs (recomputed by the trainer) → reference log-probs →
train step(s) → weight sync → periodic eval → checkpoint → metrics.

Two of those passes are skipped where they change no number (``trainer.passes``): with one optimizer step
per episode and a deterministic forward, the old log-probs are the detached log-probs of the training
forward; with ``kl_coef`` 0 the reference model exists only if ``grpo.log_reference_kl`` asks for its KL.

This is ChatLearn's GRPO (REFERENCE §4), the parity target: population-std group advantages, PPO clip
with a constant loss cap of 3.0, k3 KL in the loss (coefficient 0 by default, then logged on request), token mean
over the global batch. It departs from textbook GRPO in the usual ways: no KL in the reward, one optimizer
step per episode by default (fully on-policy, ratio ≈ 1), groups with equal rewards contribute zero
advantage but still count in the token denominator.

An episode (``trainer.episode``) is two halves: ``collect`` (rollout → reward → advantages, on the driver that hosts the engine)
gives a batch that can be saved and replayed; ``learn`` (old/ref log-probs → train steps, on every rank)
consumes it. The equivalence gates replay one collected batch across layouts through the same ``learn``.
The loop sees a training backend, a rollout engine and a ``Job`` (who drives), never a process group.

With ``grpo.max_staleness`` ≥ 1 the episodes run through ``trainer.pipeline`` instead: the engine, in a process of
its own, generates the next episode's rollout while the ranks learn on this one.

Every random choice of an episode is derived from (seed, episode), never carried from the previous one,
so a run resumed from a checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from matrix import ResolvedRecipe
from trainer import checkpoint, heartbeat, interrupts
from trainer.atomic import DiskFull
from trainer.backends.base import TrainingBackend
from trainer.backends.errors import NonFiniteLossError
from trainer.episode import episode_seed, evaluate, run_episode
from trainer.metrics import MetricsLog, StageTimer
from trainer.parallel.job import Job
from trainer.passes import passes
from trainer.rollout.base import NonFiniteLogitsError, RolloutEngine
from trainer.tasks import Task
from trainer.warmstart import warm_start
from trainer.weight_sync import sync_weights


class RunStopped(Exception):
    """The run stopped on purpose (non-finite loss); the message says why and what was kept."""


def _kept(run_dir: Path) -> str:
    kept = checkpoint.latest_episode(run_dir)
    return f"last good checkpoint: episode {kept[0]} in {run_dir / 'checkpoints'}" if kept else "no checkpoint yet"


def _stopped(run_dir: Path, episode: int, cause: Exception) -> RunStopped:
    """The one line a run ends with when ``cause`` stops it at ``episode``, naming what it keeps."""
    return RunStopped(f"episode {episode}: {cause}; the run stopped ({_kept(run_dir)})")


def train(r: ResolvedRecipe, run_dir: Path, *, task: Task, policy: TrainingBackend, ref: TrainingBackend | None,
          engine: RolloutEngine | None, log: MetricsLog, job: Job, resume: bool = False,
          behaviour: TrainingBackend | None = None) -> dict:
    """Run (or resume) recipe ``r`` in ``run_dir``; returns the summary. Raises RunStopped on a non-finite loss.

    Collective: every rank of ``job`` calls it; ``engine`` and ``log`` matter on the driver only. ``ref`` is
    None when the recipe needs no reference model, ``behaviour`` when it does not pipeline (``trainer.passes``).
    """
    run, need = r.recipe.run, passes(r)
    start = 0
    models = {"policy": policy, "reference": ref} | ({"behaviour": behaviour} if behaviour is not None else {})
    in_flight = False  # whether a checkpoint gave the pipeline the weights of its in-flight batch
    # the driver's choice for every rank: a node whose view of the shared directory lags must not pick another
    saved = job.broadcast(job.on_driver(lambda: checkpoint.latest_episode(run_dir))) if resume else None
    if saved is not None:
        start, directory = saved
        state = checkpoint.read(directory, job.rank)
        if ref is not None and state.get("reference") is None:
            raise RunStopped(f"the checkpoint of episode {start} holds no reference model (its run had "
                             "none: kl_coef 0 without log_reference_kl), but this recipe needs one")
        # a synchronous run's checkpoint resumed with pipelining: its first batch is generated on-policy
        in_flight = state.get("behaviour") is not None
        checkpoint.restore(directory, state, models | ({} if in_flight else {"behaviour": None}))
        # the row of the checkpoint's episode rides in it: a kill between the checkpoint and the row loses nothing
        if log.truncate_after(start) != start and state.get("row") is not None:
            log.log(start, state["row"])
        del state  # the models hold what they need: the file's tensors would stay mapped for the whole run
    else:
        log.truncate_after(0)  # a run killed before its first checkpoint starts over in place
        if run.warm_start_steps:
            warm_start(policy, task, r, show=job.is_driver)
            if ref is not None:
                ref.copy_weights_from(policy)
    if behaviour is None:
        pipeline = None
        sync_weights(policy, engine, job)
    else:
        from trainer.pipeline import Pipeline

        if not in_flight:
            behaviour.copy_weights_from(policy)
        pipeline = Pipeline(r, task, policy, ref, behaviour, engine, job, need)
        pipeline.start(start, behaviour_version=start - 1 if in_flight else start)

    def save(episode: int, row: dict | None) -> None:
        if not policy.weights_finite():
            raise RunStopped(f"episode {episode}: the policy's weights are no longer finite, so they were "
                             f"not checkpointed ({_kept(run_dir)})")
        try:
            checkpoint.save(run_dir, episode, {"episode": episode, "world_size": job.world_size, "row": row}, job,
                            models)
        except DiskFull as exc:
            raise _stopped(run_dir, episode, exc) from None

    def stop_if_interrupted(episode: int, row: dict | None, checkpointed: bool) -> None:
        """The safe point: every rank learns whether any got a signal; if so, all checkpoint and stop."""
        signum = job.max(interrupts.received())
        if signum:
            if not checkpointed:
                save(episode, row)
            raise interrupts.RunInterrupted(episode, signum)

    heartbeat.beat()
    stop_if_interrupted(start, None, checkpointed=saved is not None)
    bar = tqdm(range(start + 1, run.episodes + 1), initial=start, total=run.episodes, desc=r.name, unit="episode",
               disable=not job.is_driver)
    try:  # the bar ends its line however the loop ends, so what is printed next starts on its own
        for episode in bar:
            timer, started = StageTimer(job.platform), time.perf_counter()
            try:
                if pipeline is None:
                    row, samples = run_episode(episode, r, task, policy, ref, engine, timer, job, need)
                else:
                    row, samples = pipeline.episode(episode, timer)
            except (NonFiniteLossError, NonFiniteLogitsError) as exc:
                raise _stopped(run_dir, episode, exc) from None
            if r.recipe.eval.every and episode % r.recipe.eval.every == 0:
                with timer("eval"):
                    if pipeline is not None:
                        pipeline.pause()  # the engine, free of its in-flight generation, gets the weights just trained
                    row |= job.on_driver(lambda e=episode: evaluate(engine, task, r, episode_seed(run.seed, e, 2))) or {}

            def finished(row: dict = row, timer: StageTimer = timer, started: float = started) -> dict:
                tokens = row["tokens/prompt"] + row["tokens/response"]
                return row | timer.as_metrics() | job.platform.memory_metrics() | {
                    "throughput/tokens_per_s": tokens / (time.perf_counter() - started),
                    "clock/unix": round(time.time(), 3)}

            checkpointed = (run.checkpoint_every and episode % run.checkpoint_every == 0) or episode == run.episodes
            if checkpointed:
                with timer("checkpoint"):
                    save(episode, finished())
            done = finished()
            try:
                log.log(episode, done)
                log.samples(episode, samples)
            except DiskFull as exc:
                raise _stopped(run_dir, episode, exc) from None
            bar.set_postfix(reward=f"{done['reward/mean']:.3f}", len=f"{done['response_length/mean']:.1f}")
            heartbeat.beat()
            stop_if_interrupted(episode, done, checkpointed)
    finally:
        bar.close()
    return log.write_summary({"recipe": r.name, "run_dir": str(run_dir), "status": "finished"})
