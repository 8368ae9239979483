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

An episode is two halves: ``collect`` (rollout → reward → advantages, on the driver that hosts the engine)
gives a batch that can be saved and replayed; ``learn`` (old/ref log-probs → train steps, on every rank)
consumes it. The equivalence gates replay one collected batch across layouts through the same ``learn``.
The loop sees a training backend, a rollout engine and a ``Job`` (who drives), never a process group.

With ``grpo.max_staleness`` ≥ 1 the episodes run through ``trainer.pipeline`` instead: the engine, in a process of
its own, generates the next episode's rollout while the ranks learn on this one.

Every random choice of an episode is derived from (seed, episode), never carried from the previous one,
so a run resumed from a checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from matrix import ResolvedRecipe
from matrix.schema import GRPO, Sampling
from trainer import checkpoint, heartbeat, interrupts
from trainer.algo import group_outcome_ratios
from trainer.algo.mismatch import mismatch_metrics, scatter_responses
from trainer.atomic import DiskFull
from trainer.backends.base import TrainingBackend
from trainer.backends.errors import NonFiniteLossError
from trainer.batching import pack
from trainer.metrics import MetricsLog, StageTimer, length_stats
from trainer.objective import advantages, make_loss_fn
from trainer.parallel.job import Job
from trainer.passes import Passes, passes
from trainer.rollout.base import NonFiniteLogitsError, RolloutEngine, RolloutOutput, SamplingParams
from trainer.tasks import Prompt, Task
from trainer.warmstart import warm_start
from trainer.weight_sync import sync_weights


class RunStopped(Exception):
    """The run stopped on purpose (non-finite loss); the message says why and what was kept."""


def _episode_seed(seed: int, episode: int, stage: int) -> int:
    return (seed * 1_000_003 + episode * 101 + stage) % (2**31 - 1)


def _params(s: Sampling, r: ResolvedRecipe, task: Task, seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_tokens=r.recipe.grpo.max_response_len, seed=seed, stop_token_ids=[task.eos_id], n=n)


def _kept(run_dir: Path) -> str:
    kept = checkpoint.latest_episode(run_dir)
    return f"last good checkpoint: episode {kept[0]} in {run_dir / 'checkpoints'}" if kept else "no checkpoint yet"


def _stopped(run_dir: Path, episode: int, cause: Exception) -> RunStopped:
    """The one line a run ends with when ``cause`` stops it at ``episode``, naming what it keeps."""
    return RunStopped(f"episode {episode}: {cause}; the run stopped ({_kept(run_dir)})")


def evaluate(engine: RolloutEngine, task: Task, r: ResolvedRecipe, seed: int) -> dict[str, float]:
    """Mean reward of one sample per held-out problem at the eval sampling settings."""
    s = r.recipe.eval.sampling
    problems = task.eval[: r.recipe.eval.prompts]
    outs = engine.generate([p.ids for p in problems], _params(s, r, task, seed))
    rewards = [task.score(o.text, p)[0] for o, p in zip(outs, problems, strict=True)]
    return {"eval/reward_mean": sum(rewards) / len(rewards)}


@dataclass
class Collected:
    """One episode's rollout, scored: what ``learn`` needs (``batch``) and what the metrics report."""

    # input_ids, attention_mask (B, T); response_mask, engine_logprobs (B, T-1); advantages (B,)
    batch: dict[str, torch.Tensor]
    rewards: torch.Tensor  # (B,)
    lengths: torch.Tensor  # (B,) response tokens
    prompt_tokens: int
    seconds: dict[str, float]  # rollout, reward
    reward_failures: int = 0  # responses scored 0 because the reward function failed (grpo.reward)
    samples: list[dict] = field(default_factory=list)  # a few rows for samples.jsonl (run.samples_per_episode)


class PendingCollect:
    """An episode's rollout started in the engine; ``finish`` waits for it, then scores it (once)."""

    def __init__(self, episode: int, r: ResolvedRecipe, task: Task, engine: RolloutEngine):
        grpo, seed, n = r.recipe.grpo, r.recipe.run.seed, r.recipe.grpo.samples_per_prompt
        self.r, self.task, self._collected = r, task, None
        self.picked: list[Prompt] = random.Random(_episode_seed(seed, episode, 0)).sample(task.train,
                                                                                          grpo.prompts_per_episode)
        self.started = time.perf_counter()
        params = _params(grpo.sampling, r, task, _episode_seed(seed, episode, 1), n)
        self.generation = engine.start_generate([p.ids for p in self.picked], params)  # n per prompt

    def finish(self) -> Collected:
        if self._collected is None:
            self._collected = self._score(self.generation.result())
        return self._collected

    def _score(self, outs: list[RolloutOutput]) -> Collected:
        r, task, n = self.r, self.task, self.r.recipe.grpo.samples_per_prompt
        group = [p for p in self.picked for _ in range(n)]  # the rows of `outs`
        timer = StageTimer()
        timer.seconds["rollout"] = time.perf_counter() - self.started
        with timer("rollout"):
            batch = pack([p.ids for p in group], [list(o.token_ids) for o in outs], task.pad_id)
            # the engine's sampling log-probs (raw, or processed ones equal to raw: trainer.rollout.factory refuses
            # the rest), under the response mask: mismatch metrics, `grpo.tis_cap`
            batch["engine_logprobs"] = scatter_responses(batch["response_mask"], [o.logprobs for o in outs])
        with timer("reward"):
            scored = [task.score(o.text, p) for o, p in zip(outs, group, strict=True)]
            rewards = torch.tensor([value for value, _ in scored])
            batch["advantages"] = advantages(r.recipe.grpo, rewards).float()
        samples = [{"prompt": task.decode(group[i].ids), "response": outs[i].text,
                    "ground_truth": group[i].ground_truth, "reward": scored[i][0],
                    "logprobs": [round(float(x), 6) for x in outs[i].logprobs]}
                   for i in range(0, len(group), n)[: r.recipe.run.samples_per_episode]]  # the first of each prompt
        return Collected(batch, rewards, torch.tensor([len(o.token_ids) for o in outs]),
                         sum(len(p.ids) for p in group), {k: timer.seconds[k] for k in ("rollout", "reward")},
                         reward_failures=sum(not ok for _, ok in scored), samples=samples)


def collect(episode: int, r: ResolvedRecipe, task: Task, engine: RolloutEngine) -> Collected:
    """Rollout → reward → advantages for ``episode`` (prompts and sampling seeded by the episode)."""
    return PendingCollect(episode, r, task, engine).finish()


def learn(batch: dict[str, torch.Tensor], r: ResolvedRecipe, policy: TrainingBackend, ref: TrainingBackend | None,
          timer: StageTimer, need: Passes | None = None) -> dict[str, float]:
    """Old and reference log-probs where ``need`` (default: ``passes(r)``) says so, then the recipe's train
    steps on ``batch``; every rank calls it. ``batch["old_logprobs"]`` holds the old log-probs afterwards either
    way (from the separate pass, or from the training forward). ``ref`` is None when no reference is needed."""
    need = need or passes(r)
    logprob_passes(batch, r, policy, ref, timer, need)
    return train_steps(batch, r, policy, timer, need)


def logprob_passes(batch: dict[str, torch.Tensor], r: ResolvedRecipe, old: TrainingBackend, ref: TrainingBackend | None,
                   timer: StageTimer, need: Passes) -> None:
    """The no-grad passes ``need`` asks for: ``batch["old_logprobs"]`` from ``old`` (the policy, or under
    off-policy pipelining the weights that generated the batch) and ``batch["ref_logprobs"]``."""
    mbs = r.recipe.grpo.micro_batch_size
    if need.old_logprobs:
        with timer("old_logprob"):
            batch["old_logprobs"] = old.logprobs(batch, micro_batch_size=mbs)
    if need.reference:
        with timer("ref_logprob"):
            batch["ref_logprobs"] = ref.logprobs(batch, micro_batch_size=mbs)


def train_steps(batch: dict[str, torch.Tensor], r: ResolvedRecipe, policy: TrainingBackend, timer: StageTimer,
                need: Passes) -> dict[str, float]:
    """The recipe's optimizer steps on ``batch`` (after ``logprob_passes``); returns the last step's stats."""
    grpo = r.recipe.grpo
    mbs = grpo.micro_batch_size
    make_loss = lambda tokens: make_loss_fn(grpo, tokens, need)  # noqa: E731
    with timer("train"):
        if need.old_logprobs:
            for _ in range(grpo.steps_per_episode):
                stats = policy.train_step(batch, make_loss, micro_batch_size=mbs)
        else:  # the one step of the episode (trainer.passes): its forward gives the old log-probs
            stats, batch["old_logprobs"] = policy.train_step(batch, make_loss, micro_batch_size=mbs,
                                                             return_logprobs=True)
    return stats


def run_episode(episode: int, r: ResolvedRecipe, task: Task, policy: TrainingBackend, ref: TrainingBackend | None,
                engine: RolloutEngine | None, timer: StageTimer, job: Job, need: Passes
                ) -> tuple[dict[str, float], list[dict]]:
    """collect on the driver → the batch to every rank → learn → weight sync to the driver's engine; returns the
    episode's metrics row and its samples (run.samples_per_episode)."""
    grpo = r.recipe.grpo
    collected: Collected = job.broadcast(job.on_driver(lambda: collect(episode, r, task, engine)))
    for stage, seconds in collected.seconds.items():
        timer.seconds[stage] += seconds
    job.on_driver(lambda: engine.sleep())  # colocated: the trainer's turn on the devices
    batch = job.platform.to_device(collected.batch)  # once per episode; every pass of learn reads it there
    stats = learn(batch, r, policy, ref, timer, need)
    # The engine's raw sampling log-probs against the trainer's old log-probs of the same tokens (both before
    # temperature / top-k / top-p; from the separate pass or the training forward, the same weights either
    # way): how far the engine's weights and kernels are from the trainer's.
    mismatch = mismatch_metrics(batch["old_logprobs"], batch["engine_logprobs"], batch["response_mask"])
    with timer("sync"):
        synced = sync_weights(policy, engine, job)

    return episode_row(collected, stats, mismatch, synced, timer, grpo), collected.samples


def episode_row(collected: Collected, stats: dict[str, float], mismatch: dict[str, float], synced: int,
                timer: StageTimer, grpo: GRPO) -> dict:
    """An episode's metrics from its batch, its train stats, mismatch metrics and sync."""
    lengths, rewards = collected.lengths, collected.rewards
    all_tokens = collected.prompt_tokens + int(lengths.sum())
    return {
        "reward/mean": rewards.mean().item(),
        "reward/failed": collected.reward_failures,
        **{f"reward/{k}": v for k, v in group_outcome_ratios(rewards, grpo.samples_per_prompt).items()},
        **length_stats(lengths, grpo.max_response_len),
        **stats,
        **mismatch,
        "sync/bytes": synced,
        "throughput/generation_tokens_per_s": int(lengths.sum()) / max(timer.seconds["rollout"], 1e-9),
        "throughput/train_tokens_per_s": all_tokens * grpo.steps_per_episode / max(timer.seconds["train"], 1e-9),
        "tokens/prompt": collected.prompt_tokens,
        "tokens/response": int(lengths.sum()),
    }


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
    saved = checkpoint.latest_episode(run_dir) if resume else None
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
                    row |= job.on_driver(lambda e=episode: evaluate(engine, task, r, _episode_seed(run.seed, e, 2))) or {}

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
