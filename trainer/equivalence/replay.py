"""The two halves of a gate run: prepare one rollout (one process), and replay it as every rank of a layout.

``prepare`` builds the recipe's model at its seed (after its warm start, so rewards and advantages vary),
collects one episode with the torch engine and keeps the whole initial weights: every layout starts from
exactly these weights and this batch. ``replay_rank`` is what each rank of a layout runs: the loop's own
``learn`` for ``steps`` steps, recording per step the old log-probs ``learn`` computed (by the separate pass
or from the training forward, as ``trainer.passes`` decides for the recipe), the loss and the grad
norm, then the whole weights under HF names; the driver returns the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matrix import ResolvedRecipe


@dataclass(frozen=True)
class Replay:
    resolved: ResolvedRecipe  # the recipe with the layout under test
    initial: dict  # whole HF-named weights
    batch: dict  # the collected episode's batch
    steps: int


def prepare(resolved: ResolvedRecipe, root) -> tuple[dict, dict]:
    """(whole initial weights, collected batch) of one episode of ``resolved`` on one process."""
    from trainer.backends.base import build_backend
    from trainer.episode import collect
    from trainer.parallel.process_groups import process_groups
    from trainer.rollout.factory import build_engine
    from trainer.tasks import build_task
    from trainer.warmstart import warm_start
    from trainer.worker import one_process

    single = one_process(resolved)
    with process_groups(single.layout):
        torch.manual_seed(single.recipe.run.seed)
        task = build_task(single, root=root)
        policy = build_backend(single, seed=single.recipe.run.seed)
        if single.recipe.run.warm_start_steps:
            warm_start(policy, task, single)
        engine = build_engine(single, task)
        engine.update_weights(policy.hf_named_tensors())
        collected = collect(1, single, task, engine)
        return dict(policy.hf_named_tensors()), collected.batch


def replay_rank(replay: Replay) -> dict:
    """Run ``replay.steps`` learn steps on the saved batch as this rank; the driver returns the record."""
    from trainer.parallel.rank import rank_session
    from trainer.platform import choose_platform

    r = replay.resolved
    with rank_session(r.layout, choose_platform(r.device)) as me:
        from trainer.backends.base import build_backend
        from trainer.episode import learn
        from trainer.metrics import StageTimer
        from trainer.passes import passes

        platform = me.platform
        policy = build_backend(r, seed=r.recipe.run.seed, initial=replay.initial, platform=platform)
        ref = build_backend(r, seed=r.recipe.run.seed, trainable=False, initial=replay.initial,
                            platform=platform) if passes(r).reference else None
        steps = []
        for _ in range(replay.steps):
            batch = platform.to_device({k: v.clone() for k, v in replay.batch.items()})
            stats = learn(batch, r, policy, ref, StageTimer())
            steps.append({"logprobs": platform.to_host(batch["old_logprobs"]), "loss": stats["loss"],
                          "grad_norm": stats["grad_norm"]})
        # HF names: layouts of different backends compare; in host memory: they leave the rank
        weights = {name: platform.to_host(t) for name, t in policy.hf_named_tensors()}
        return {"steps": steps, "weights": weights, "world_size": me.world}
