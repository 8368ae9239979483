"""A train step reads values back to the host a fixed number of times, however many micro-batches it runs.

On a GPU every ``.item()``, ``float(t)``, ``.tolist()`` or ``bool(t)`` of a device tensor makes the host wait
until the device has caught up, so a read per micro-batch stalls the launch of the next micro-batch's work each
time. These tests count the reads made by the trainer's own code (not torch's or megatron-core's) during one
step of the real GRPO objective, for one batch split into few and into many micro-batches: the counts must be
equal. On CPU nothing waits, but the code that would is the same.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import trainer
from matrix.schema import Layout
from trainer.objective import make_loss_fn
from trainer.parallel.process_groups import process_groups
from trainer.worker import one_process

TRAINER = str(Path(trainer.__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def host_reads() -> Counter:
    """Counts, per (file, line) of the trainer package, the tensor reads to the host made there."""
    counts: Counter = Counter()

    def counting(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(TRAINER):
                counts[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"] += 1
            return original(self, *args, **kwargs)

        return read

    originals = {name: getattr(torch.Tensor, name) for name in READS}
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def grpo_batch(rows: int = 8, width: int = 12, vocab: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    ids[0, 8:] = 0
    response = mask[:, 1:].float()
    response[:, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response,
            "old_logprobs": -torch.rand(rows, width - 1, generator=g),
            "ref_logprobs": -torch.rand(rows, width - 1, generator=g),
            "advantages": torch.randn(rows, generator=g)}


def reads_per_step(backend, grpo, **step) -> Counter:
    backend.train_step(grpo_batch(), lambda tokens: make_loss_fn(grpo, tokens), **step)  # warm: lazy state
    with host_reads() as counts:
        backend.train_step(grpo_batch(), lambda tokens: make_loss_fn(grpo, tokens), **step)
    return counts


def test_megatron_train_step_reads_the_host_as_often_for_8_micro_batches_as_for_1(matrix, groups):
    from trainer.backends.megatron import MegatronBackend

    resolved = matrix.resolve("tiny-qwen2.5")
    grpo = resolved.recipe.grpo.model_copy(update={"kl_coef": 0.01, "entropy_coef": 0.01, "tis_cap": None})
    policy = MegatronBackend(resolved, seed=0)
    few, many = (reads_per_step(policy, grpo, micro_batch_size=size) for size in (8, 1))
    assert many == few, f"reads that grow with the micro-batches: {many - few}"


def test_fsdp_train_step_reads_the_host_as_often_for_8_micro_batches_as_for_1(matrix):
    from trainer.backends.fsdp import FSDPBackend

    resolved = one_process(matrix.resolve("tiny-qwen3-fsdp"))
    grpo = resolved.recipe.grpo.model_copy(update={"kl_coef": 0.01, "entropy_coef": 0.01})
    counts = []
    with process_groups(Layout(fsdp=True)):
        for budget in (1024, 12):  # tokens per packed micro-batch: the 8 rows in one, or one row each
            fsdp = resolved.recipe.fsdp.model_copy(update={"max_token_in_packing": budget})
            r = resolved.model_copy(update={"recipe": resolved.recipe.model_copy(update={"fsdp": fsdp})})
            counts.append(reads_per_step(FSDPBackend(r, seed=0), grpo, micro_batch_size=1))
    few, many = counts
    assert many == few, f"reads that grow with the micro-batches: {many - few}"


@pytest.mark.parametrize("metric", ["loss/pg", "loss/kl"])
def test_the_objectives_metrics_stay_on_the_device(matrix, metric):
    """What the step sums is left as tensors; one read per step brings every sum over."""
    grpo = matrix.resolve("tiny-qwen2.5").recipe.grpo.model_copy(update={"kl_coef": 0.01})
    batch = grpo_batch(rows=2)
    logp = -torch.rand(2, 11)
    _, metrics = make_loss_fn(grpo, 5)(logp, torch.zeros_like(logp), batch)
    assert isinstance(metrics[metric], torch.Tensor) and not metrics[metric].requires_grad
