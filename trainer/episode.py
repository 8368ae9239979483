"""One GRPO episode, in two halves: ``collect`` (rollout → reward → advantages, on the driver that hosts the
engine) gives a batch that can be saved and replayed; ``learn`` (old/ref log-probs → train steps, on every rank)
consumes it; ``episode_row`` is its metrics row; ``run_episode`` is the synchronous whole. The loop
(``trainer.loop``), the off-policy pipeline (``trainer.pipeline``) and the equivalence replay all run episodes from
these pieces. Every random choice of an episode is derived from (seed, episode), never carried from the previous one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from matrix import ResolvedRecipe
from matrix.schema import GRPO, Sampling
from trainer.algo import group_outcome_ratios
from trainer.algo.mismatch import mismatch_metrics, scatter_responses
from trainer.backends.base import TrainingBackend
from trainer.batching import pack
from trainer.metrics import StageTimer, length_stats
from trainer.objective import advantages, make_loss_fn
from trainer.parallel.job import Job
from trainer.passes import Passes, passes
from trainer.rollout.base import RolloutEngine, RolloutOutput, SamplingParams
from trainer.tasks import Prompt, Task
from trainer.weight_sync import sync_weights


def episode_seed(seed: int, episode: int, stage: int) -> int:
    return (seed * 1_000_003 + episode * 101 + stage) % (2**31 - 1)


def _params(s: Sampling, r: ResolvedRecipe, task: Task, seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_tokens=r.recipe.grpo.max_response_len, seed=seed, stop_token_ids=[task.eos_id], n=n)


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
        self.picked: list[Prompt] = random.Random(episode_seed(seed, episode, 0)).sample(task.train,
                                                                                          grpo.prompts_per_episode)
        self.started = time.perf_counter()
        params = _params(grpo.sampling, r, task, episode_seed(seed, episode, 1), n)
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


