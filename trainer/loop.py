"""The GRPO loop: one episode per iteration, phases in order, every phase timed.

episode = rollout → old log-probs (recomputed by the trainer) → reference log-probs → reward →
advantages → train step(s) → weight sync → periodic eval → checkpoint → metrics.

This is ChatLearn's GRPO (REFERENCE §4), the parity target: population-std group advantages, PPO clip
with a constant loss cap of 3.0, k3 KL in the loss (coefficient 0 by default, always logged), token mean
over the global batch. It departs from textbook GRPO in the usual ways: no KL in the reward, one optimizer
step per episode by default (fully on-policy, ratio ≈ 1), groups with equal rewards contribute zero
advantage but still count in the token denominator.

Every random choice of an episode is derived from (seed, episode), never carried from the previous one,
so a run resumed from a checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from matrix import ResolvedRecipe
from matrix.schema import Sampling
from trainer import checkpoint
from trainer.algo import group_outcome_ratios
from trainer.backends.errors import NonFiniteLossError
from trainer.backends.megatron import MegatronBackend
from trainer.batching import micro_batches, pack
from trainer.metrics import MetricsLog, StageTimer, length_stats
from trainer.objective import advantages, make_loss_fn
from trainer.reward.grader import score
from trainer.rollout.base import NonFiniteLogitsError, SamplingParams
from trainer.rollout.torch_engine import TorchEngine
from trainer.tasks import Prompt, Task, build_task
from trainer.warmstart import warm_start


class RunStopped(Exception):
    """The run stopped on purpose (non-finite loss); the message says why and what was kept."""


def _episode_seed(seed: int, episode: int, stage: int) -> int:
    return (seed * 1_000_003 + episode * 101 + stage) % (2**31 - 1)


def _params(s: Sampling, r: ResolvedRecipe, task: Task, seed: int) -> SamplingParams:
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_tokens=r.recipe.grpo.max_response_len, seed=seed, stop_token_ids=[task.eos_id])


def _kept(run_dir: Path) -> str:
    kept = checkpoint.latest(run_dir)
    return f"last good checkpoint: episode {kept[0]} in {run_dir / 'checkpoints'}" if kept else "no checkpoint yet"


def _logprobs(backend: MegatronBackend, batch: dict, size: int) -> torch.Tensor:
    return torch.cat(
        [backend.logprobs(mb["input_ids"], mb["attention_mask"]) for mb in micro_batches(batch, size)]
    )


def evaluate(engine: TorchEngine, task: Task, r: ResolvedRecipe, seed: int) -> dict[str, float]:
    """Mean reward of one sample per held-out problem at the eval sampling settings."""
    s = r.recipe.eval.sampling
    problems = task.eval[: r.recipe.eval.prompts]
    outs = engine.generate([p.ids for p in problems], _params(s, r, task, seed))
    rewards = [
        score(o.text, p.ground_truth, r.recipe.grpo.grader) for o, p in zip(outs, problems, strict=True)
    ]
    return {"eval/reward_mean": sum(rewards) / len(rewards)}


def run_episode(
    episode: int,
    r: ResolvedRecipe,
    task: Task,
    policy: MegatronBackend,
    ref: MegatronBackend,
    engine: TorchEngine,
    timer: StageTimer,
) -> dict[str, float]:
    grpo, seed, n = r.recipe.grpo, r.recipe.run.seed, r.recipe.grpo.samples_per_prompt
    picked: list[Prompt] = random.Random(_episode_seed(seed, episode, 0)).sample(
        task.train, grpo.prompts_per_episode
    )
    group = [p for p in picked for _ in range(n)]

    with timer("rollout"):
        params = _params(grpo.sampling, r, task, _episode_seed(seed, episode, 1))
        outs = engine.generate([p.ids for p in group], params)
        batch = pack([p.ids for p in group], [list(o.token_ids) for o in outs], task.pad_id)
    with timer("old_logprob"):
        batch["old_logprobs"] = _logprobs(policy, batch, grpo.micro_batch_size)
    with timer("ref_logprob"):
        batch["ref_logprobs"] = _logprobs(ref, batch, grpo.micro_batch_size)
    with timer("reward"):
        rewards = torch.tensor(
            [score(o.text, p.ground_truth, grpo.grader) for o, p in zip(outs, group, strict=True)]
        )
        batch["advantages"] = advantages(grpo, rewards).float()

    global_tokens = batch["response_mask"].sum().item()  # one process: the global count is the local one
    with timer("train"):
        for _ in range(grpo.steps_per_episode):
            stats = policy.train_step(
                micro_batches(batch, grpo.micro_batch_size), make_loss_fn(grpo, global_tokens)
            )
    with timer("sync"):
        engine.update_weights(policy.hf_named_tensors())

    lengths = torch.tensor([len(o.token_ids) for o in outs])
    prompt_tokens = sum(len(p.ids) for p in group)
    all_tokens = prompt_tokens + int(lengths.sum())
    return {
        "reward/mean": rewards.mean().item(),
        **{f"reward/{k}": v for k, v in group_outcome_ratios(rewards, n).items()},
        **length_stats(lengths, grpo.max_response_len),
        **stats,
        "throughput/generation_tokens_per_s": int(lengths.sum()) / max(timer.seconds["rollout"], 1e-9),
        "throughput/train_tokens_per_s": all_tokens
        * grpo.steps_per_episode
        / max(timer.seconds["train"], 1e-9),
        "tokens/prompt": prompt_tokens,
        "tokens/response": int(lengths.sum()),
    }


def train(r: ResolvedRecipe, run_dir: Path, *, log: MetricsLog, resume: bool = False) -> dict:
    """Run (or resume) recipe `r` in `run_dir`; returns the summary. Raises RunStopped on a non-finite loss."""
    run = r.recipe.run
    torch.manual_seed(run.seed)
    task = build_task(r, root=Path(__file__).resolve().parent.parent)
    policy = MegatronBackend(r, seed=run.seed)
    ref = MegatronBackend(r, seed=run.seed, trainable=False)
    engine = TorchEngine(r.model, decode=task.decode, eos_token_id=task.eos_id, pad_token_id=task.pad_id)

    start = 0
    saved = checkpoint.latest(run_dir) if resume else None
    if saved is not None:
        start, state = saved
        policy.load_state_dict(state["policy"])
        ref.load_hf(state["reference_hf"])
        log.truncate_after(start)
    elif run.warm_start_steps:
        warm_start(policy, task, r)
        ref.load_hf(dict(policy.hf_named_tensors()))
    engine.update_weights(policy.hf_named_tensors())

    def save(episode: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in policy.model.parameters()):
            raise RunStopped(f"episode {episode}: the policy's weights are no longer finite, so they were "
                             f"not checkpointed ({_kept(run_dir)})")
        checkpoint.save(
            run_dir,
            episode,
            {"episode": episode, "policy": policy.state_dict(), "reference_hf": dict(ref.hf_named_tensors())},
        )

    bar = tqdm(
        range(start + 1, run.episodes + 1), initial=start, total=run.episodes, desc=r.name, unit="episode"
    )
    for episode in bar:
        timer, started = StageTimer(), time.perf_counter()
        try:
            row = run_episode(episode, r, task, policy, ref, engine, timer)
        except (NonFiniteLossError, NonFiniteLogitsError) as exc:
            raise RunStopped(f"episode {episode}: {exc}; the run stopped ({_kept(run_dir)})") from None
        if r.recipe.eval.every and episode % r.recipe.eval.every == 0:
            with timer("eval"):
                row |= evaluate(engine, task, r, seed=_episode_seed(run.seed, episode, 2))
        if (run.checkpoint_every and episode % run.checkpoint_every == 0) or episode == run.episodes:
            with timer("checkpoint"):
                save(episode)
        row |= timer.as_metrics()
        row["throughput/tokens_per_s"] = (row["tokens/prompt"] + row["tokens/response"]) / (
            time.perf_counter() - started
        )
        log.log(episode, row)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", len=f"{row['response_length/mean']:.1f}")
    return log.write_summary({"recipe": r.name, "run_dir": str(run_dir), "status": "finished"})
