"""The training-backend interface the GRPO loop and the warm start speak to, and the factory that picks one.

A backend owns this rank's part of the model and its optimizer. Every method is collective: all ranks of
the job call it with the same arguments (the whole episode batch), and the backend takes its own share
(DP rows, CP chunks, PP stage, TP slice) and returns the whole-batch result on every rank. The loop never
sees a shard, a process group or a rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from matrix import ResolvedRecipe
from trainer.platform import CPU, Platform

# loss_fn(logp, entropy, micro_batch) -> (loss, metrics); built for the step's global token count. The metrics
# are detached scalars, left on the device: the backend sums them over micro-batches (``summed_metrics``).
LossFn = Callable[[Tensor, Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor | float]]]
MakeLossFn = Callable[[float], LossFn]


def summed_metrics(per_micro_batch: Iterable[Mapping[str, Tensor | float]]) -> dict[str, float]:
    """Each key's sum over the micro-batches, in float64, brought to the host once for the whole step: a float()
    per metric and micro-batch would make the host wait for the device that often (on a GPU, stalling the
    launch of the next micro-batch's work every time). The sum is the one a host loop over float() would
    make, to the bit: the same values, widened to float64, added in the same order."""
    totals: dict[str, Tensor] = {}
    for metrics in per_micro_batch:
        for key, value in metrics.items():
            value = torch.as_tensor(value).to(torch.float64)
            totals[key] = totals[key] + value if key in totals else value
    keys = sorted(totals)
    if not keys:
        return {}
    return dict(zip(keys, torch.stack([totals[k] for k in keys]).tolist(), strict=True))


class TrainingBackend(Protocol):
    @property
    def lr(self) -> float: ...

    def logprobs(self, batch: dict[str, Tensor], *, micro_batch_size: int) -> Tensor:
        """Per-token log-probs (B, T-1) fp32 of the right-padded batch (``input_ids`` (B, T)), no grad."""
        ...

    def train_step(self, batch: dict[str, Tensor], make_loss: MakeLossFn, *, micro_batch_size: int,
                   return_logprobs: bool = False) -> dict[str, float] | tuple[dict[str, float], Tensor]:
        """One optimizer step on the whole batch; ``make_loss(global_response_tokens)`` builds the loss.
        Returns grad_norm, lr, loss and the loss function's metrics, summed over the global batch.

        ``return_logprobs=True`` returns ``(stats, logprobs)`` instead: ``logprobs`` are the per-token
        log-probs (B, T-1) fp32 of this step's training forward, detached, i.e. of the weights *before* the
        update, whole batch on every rank, laid out exactly as ``logprobs()`` returns them. The loop takes
        them as the old log-probs when it skips the separate pass (``trainer.passes``); the loss function
        then reads no ``old_logprobs`` from the batch."""
        ...

    def hf_named_tensors(self, compute_dtype: bool = False) -> Iterator[tuple[str, Tensor]]:
        """Whole weights under HF names on the driver rank (nothing elsewhere). Collective: every rank exhausts
        the iterator (a backend may gather lazily, one tensor per step; ``trainer.weight_sync`` does this).
        ``compute_dtype``: in the dtype the model computes in (what a rollout engine serves), not the master
        weights' (a bf16 FSDP2 run keeps fp32 masters: half the bytes gathered and sent)."""
        ...

    def load_hf(self, tensors: dict[str, Tensor]) -> None:
        """Take this rank's share of whole HF-named weights."""
        ...

    def load_pretrained(self, directory: Path) -> None:
        """Take this rank's share of a pretrained weights directory (``trainer.models.pretrained``: which kinds
        there are and how each is read), reading one tensor at a time."""
        ...

    def whole_weights(self) -> dict[str, Tensor]:
        """Whole weights under the backend's own global names, on the driver rank ({} elsewhere). Collective."""
        ...

    def copy_weights_from(self, other: TrainingBackend) -> None:
        """Same layout, same weights (the reference model starts as the policy)."""
        ...

    def weights_finite(self) -> bool:
        """All ranks' weights are finite. Collective."""
        ...

    @staticmethod
    def stochastic_forward(resolved: ResolvedRecipe) -> bool:
        """Whether two training-mode forwards of the same weights can differ (dropout, MoE jitter), from the
        model this backend would build for ``resolved`` (``trainer.passes``)."""
        ...

    def save(self, directory: Path) -> dict:
        """Checkpoint: write what the backend keeps in its own format under ``directory`` (which may stay
        unwritten) and return this rank's state for its rank file; the two together resume exactly. Collective."""
        ...

    def load(self, directory: Path, own: dict) -> None:
        """Restore what ``save`` wrote into ``directory`` and returned as ``own``. Collective."""
        ...


# recipe.trainer → "module:class", imported only when chosen (megatron-core is heavy).
BACKENDS = {"megatron": "trainer.backends.megatron:MegatronBackend", "fsdp": "trainer.backends.fsdp:FSDPBackend"}


def backend_class(trainer: str) -> type:
    """The class ``recipe.trainer`` names, imported on first use."""
    import importlib

    module, _, cls = BACKENDS[trainer].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(resolved: ResolvedRecipe, *, seed: int, trainable: bool = True,
                  initial: dict[str, Tensor] | None = None, weights: Path | None = None,
                  platform: Platform = CPU) -> TrainingBackend:
    """The backend ``recipe.trainer`` names (the preflight has refused the ones not built), on ``platform``
    (the one the entry point chose; the CPU platform for tests and tools).

    Starts from, first found: ``initial``, whole HF-named weights (the names every backend reads and writes,
    so one backend's weights can start another); ``weights``, a pretrained directory checked by
    ``trainer.models.pretrained.check``; else the seed's initialisation.
    """
    return backend_class(resolved.recipe.trainer)(resolved, seed=seed, trainable=trainable, initial=initial,
                                                  weights=weights, platform=platform)
