"""Supervised warm start of the demo's tiny random model on the task's answer format.

A random 2-layer model never writes `\\boxed{...}`, so GRPO would see all-zero rewards and learn nothing.
A few seconds of cross-entropy on (prompt, `\\boxed{N}`) pairs, half of them wrong on purpose, gives a
model that answers in the right format and is right about half the time: room for GRPO to show it learns.
"""

from __future__ import annotations

import random

from tqdm import tqdm

from matrix import ResolvedRecipe
from trainer.backends.base import TrainingBackend
from trainer.batching import pack
from trainer.objective import sft_loss_fn
from trainer.tasks import Task

BATCH = 64


def warm_start(policy: TrainingBackend, task: Task, r: ResolvedRecipe, *, show: bool = True) -> dict[str, float]:
    """`run.warm_start_steps` optimizer steps of cross-entropy on `task.sft`; returns the last step's stats."""
    rng = random.Random(r.recipe.run.seed)
    stats: dict[str, float] = {}
    for _ in tqdm(range(r.recipe.run.warm_start_steps), desc="warm start", unit="step", disable=not show):
        pairs = rng.sample(task.sft, min(BATCH, len(task.sft)))
        batch = pack([p for p, _ in pairs], [resp for _, resp in pairs], task.pad_id)
        stats = policy.train_step(batch, sft_loss_fn, micro_batch_size=r.recipe.grpo.micro_batch_size)
    return stats
