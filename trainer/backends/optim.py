"""What every training backend's optimizer step shares: torch AdamW with megatron's weight-decay convention,
the recipe's LR schedule, and the global-norm clip applied the same way, so that backends agree bit for bit
on the same gradients.

Mixed precision (bf16 parameters, ``MainParamsAdamW``) is megatron's ``Float16OptimizerWithFloat16Params``
in torch: fp32 main copies of the bf16 parameters hold the optimizer's state; gradients are copied to fp32
before the clip, AdamW steps the main copies, and the bf16 parameters are set from them. megatron's own class
does not run on CPU in 0.16.1 (it accepts only ``torch.cuda.*Tensor`` parameters and allocates its unit
loss scale with ``device='cuda'``), so the same torch code runs on every platform.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from matrix import ResolvedRecipe
from trainer.backends.errors import NonFiniteLossError


class MainParamsAdamW(torch.optim.AdamW):
    """AdamW over fp32 main copies of low-precision model parameters (see the module docstring).

    ``main_grads()`` moves the model's gradients to the main copies in fp32 (the clip scales those); ``step``
    updates the main copies and writes them back, rounded, into the model's parameters. The state dict carries
    the main copies, so a resume continues from the fp32 values, not from their bf16 rounding.
    """

    def __init__(self, groups: list[dict], **kwargs):
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (model parameter, its fp32 main copy)
        main_groups = []
        for group in groups:
            mains = []
            for p in group["params"]:
                main = torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, main))
                mains.append(main)
            main_groups.append({**group, "params": mains})
        super().__init__(main_groups, **kwargs)

    @torch.no_grad()
    def main_grads(self) -> list[Tensor]:
        for p, main in self.pairs:
            main.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        return [main.grad for _, main in self.pairs if main.grad is not None]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for p, main in self.pairs:
            p.copy_(main)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, _ in self.pairs:
            p.grad = None

    def state_dict(self) -> dict:
        # references, as torch's own state_dict gives the moments: a clone would be a second fp32 model on the device
        return super().state_dict() | {"main_params": [main.detach() for _, main in self.pairs]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        mains = state_dict.pop("main_params")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for (p, main), saved in zip(self.pairs, mains, strict=True):
                main.copy_(saved)
                p.copy_(saved)

    @torch.no_grad()
    def reload_from_model(self) -> None:
        """Main copies from the model's parameters (after weights were loaded into the model)."""
        for p, main in self.pairs:
            main.copy_(p)


def optimizer_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients the optimizer steps on, for the clip: the parameters' own, or under mixed precision the
    fp32 main gradients (moved there now)."""
    if isinstance(optimizer, MainParamsAdamW):
        return optimizer.main_grads()
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def build_optimizer(parameters: Iterable[Tensor], resolved: ResolvedRecipe
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on 1-D parameters: biases and norm weights) and the recipe's LR schedule;
    over fp32 main copies (``MainParamsAdamW``) when the parameters are not fp32."""
    grpo = resolved.recipe.grpo
    decay, no_decay = [], []
    for p in parameters:
        (decay if p.ndim >= 2 else no_decay).append(p)
    low_precision = any(p.dtype != torch.float32 for p in decay + no_decay)
    optimizer = (MainParamsAdamW if low_precision else torch.optim.AdamW)(
        [{"params": decay, "weight_decay": grpo.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=grpo.lr,
        betas=tuple(grpo.adam_betas),
        eps=1e-8,
        # torch's own choice: the per-parameter loop for CPU tensors (what every CPU test and gate ran, bit for
        # bit), its multi-tensor kernels when all are on a GPU (one launch per group of tensors, not ~10 per
        # parameter: a 7B model has ~340 of them). (GPU) not verified here.
        foreach=None,
    )
    total = resolved.recipe.run.episodes * grpo.steps_per_episode
    if grpo.lr_schedule == "cosine":
        # lr · ½(1 + cos(π·step/total)), no warmup: decays to 0 at the recipe's last step.
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def for_training(model: torch.nn.Module, resolved: ResolvedRecipe, *, trainable: bool,
                 parameters: Iterable[Tensor] | None = None,
                 ) -> tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]:
    """Freeze a reference model, or give a policy its optimizer and LR schedule over ``parameters`` (default:
    all the model's; a distributed optimizer's share of them)."""
    model.requires_grad_(trainable)
    if not trainable:
        return None, None
    return build_optimizer(model.parameters() if parameters is None else parameters, resolved)


def weights_loaded(optimizer: torch.optim.Optimizer | None) -> None:
    """The model's parameters were overwritten (loaded weights): main copies follow them."""
    if isinstance(optimizer, MainParamsAdamW):
        optimizer.reload_from_model()


def state_mib(optimizer: torch.optim.Optimizer) -> float:
    """This rank's optimizer state in MiB: the per-parameter state tensors (AdamW's two moments) and, under
    mixed precision, the fp32 main parameters it steps; for sharded tensors (FSDP2's DTensors) this rank's shards."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor) and t.dim()]
    if isinstance(optimizer, MainParamsAdamW):
        tensors += [main for _, main in optimizer.pairs]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def check_finite(what: str, value: float, optimizer: torch.optim.Optimizer) -> None:
    """Drop the step's gradients and raise ``NonFiniteLossError`` when ``value`` is not finite."""
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(what, value)


def clip_and_step(grad_norm: float, clip: float, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """Scale the optimizer's gradients (``optimizer_grads``) to norm ``clip`` when above it, step optimizer
    and schedule; returns the step's lr."""
    check_finite("grad norm", grad_norm, optimizer)
    grads = optimizer_grads(optimizer)
    if grad_norm > clip:
        for g in grads:
            g.mul_(clip / (grad_norm + 1e-6))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr
