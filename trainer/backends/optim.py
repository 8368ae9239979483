"""What every training backend's optimizer step shares: torch AdamW with megatron's weight-decay convention,
the recipe's LR schedule, and the global-norm clip applied the same way, so that backends agree bit for bit
on the same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from matrix import ResolvedRecipe
from trainer.backends.errors import NonFiniteLossError


def build_optimizer(parameters: Iterable[Tensor], resolved: ResolvedRecipe
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on 1-D parameters: biases and norm weights) and the recipe's LR schedule."""
    grpo = resolved.recipe.grpo
    decay, no_decay = [], []
    for p in parameters:
        (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": grpo.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=grpo.lr,
        betas=tuple(grpo.adam_betas),
        eps=1e-8,
        foreach=False,  # the per-parameter loop is bit-reproducible across runs on CPU
    )
    total = resolved.recipe.run.episodes * grpo.steps_per_episode
    if grpo.lr_schedule == "cosine":
        # lr · ½(1 + cos(π·step/total)), no warmup: decays to 0 at the recipe's last step.
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def for_training(model: torch.nn.Module, resolved: ResolvedRecipe, *, trainable: bool
                 ) -> tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]:
    """Freeze a reference model, or give a policy its optimizer and LR schedule."""
    model.requires_grad_(trainable)
    return build_optimizer(model.parameters(), resolved) if trainable else (None, None)


def check_finite(what: str, value: float, optimizer: torch.optim.Optimizer) -> None:
    """Drop the step's gradients and raise ``NonFiniteLossError`` when ``value`` is not finite."""
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(what, value)


def clip_and_step(grads: Iterable[Tensor], grad_norm: float, clip: float, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """Scale the gradients to norm ``clip`` when above it, step optimizer and schedule; returns the step's lr."""
    check_finite("grad norm", grad_norm, optimizer)
    if grad_norm > clip:
        for g in grads:
            g.mul_(clip / (grad_norm + 1e-6))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr
