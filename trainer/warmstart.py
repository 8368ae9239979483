"""Supervised warm start of the demo's tiny random model on the task's answer format.

A random 2-layer model never writes `\\boxed{...}`, so GRPO would see all-zero rewards and learn nothing.
A few seconds of cross-entropy on (prompt, `\\boxed{N}`) pairs, half of them wrong on purpose, gives a
model that answers in the right format and is right about half the time: room for GRPO to show it learns.
"""

from __future__ import annotations

import random

from tqdm import tqdm

from matrix import ResolvedRecipe
from trainer.backends.megatron import MegatronBackend
from trainer.batching import micro_batches, pack
from trainer.objective import sft_loss_fn
from trainer.tasks import Task

BATCH = 64


def warm_start(policy: MegatronBackend, task: Task, r: ResolvedRecipe) -> dict[str, float]:
    """`run.warm_start_steps` optimizer steps of cross-entropy on `task.sft`; returns the last step's stats."""
    rng = random.Random(r.recipe.run.seed)
    stats: dict[str, float] = {}
    for _ in tqdm(range(r.recipe.run.warm_start_steps), desc="warm start", unit="step"):
        pairs = rng.sample(task.sft, min(BATCH, len(task.sft)))
        batch = pack([p for p, _ in pairs], [resp for _, resp in pairs], task.pad_id)
        tokens = batch["response_mask"].sum().item()
        stats = policy.train_step(micro_batches(batch, r.recipe.grpo.micro_batch_size), sft_loss_fn(tokens))
    return stats
