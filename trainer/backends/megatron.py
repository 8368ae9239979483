"""The megatron-core training backend the GRPO loop drives: log-probs, train steps, weights in HF names.

One process today: gloo with world size 1 and megatron ``parallel_state`` built from the recipe's layout
(all degrees 1), so multi-process gloo layouts only add a launcher. The model is megatron-core's
``GPTModel`` from ``trainer.models.build``; its forward path (embedding → decoder → output layer) is the
one used on GPUs, with the project's SDPA core attention.

Optimizer: torch ``AdamW`` + ``clip_grad_norm_``. megatron-core's ``get_megatron_optimizer`` does not run
on CPU in 0.16.1 (``FP32Optimizer`` allocates its loss scale with ``device='cuda'``, and grad-norm
clipping goes through CUDA multi-tensor kernels), so the CPU backend uses torch's, with megatron's
convention of no weight decay on biases and norm weights (1-D parameters).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
from megatron.core.tensor_parallel import random as mcore_random
from torch import Tensor

from trainer.algo.entropy import entropy_from_logits
from trainer.backends.errors import NonFiniteLossError
from trainer.models.build import build_gpt_model
from trainer.models.weight_map import hf_to_mcore, iter_hf
from trainer.parallel.process_groups import init_process_groups

LossFn = Callable[[Tensor, Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, float | Tensor]]]

# Rows per no-grad forward in `logprobs`: bounds the (rows, T, V) fp32 logits to ~64 MiB.
_LOGIT_BUDGET = 1 << 24


def token_logprobs(logits: Tensor, input_ids: Tensor, *, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log p(input_ids[:, t+1] | ≤ t) from logits (B, T, V) → (B, T-1) fp32, and entropy (B, T-1) or None."""
    logits = logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp, entropy_from_logits(logits) if with_entropy else None


class MegatronBackend:
    """Policy model + optimizer on megatron-core (CPU), for a resolved matrix recipe."""

    def __init__(self, resolved, *, seed: int, trainable: bool = True):
        layout = resolved.layout
        degrees = (layout.tp, layout.pp, layout.cp, layout.ep, layout.expert_tp)
        if any(d != 1 for d in degrees) or layout.fsdp or (layout.dp or 1) != 1:
            raise NotImplementedError(
                f"layout {resolved.recipe.layout!r} needs several processes; the megatron backend runs "
                f"single-process (all degrees 1) until the gloo launcher lands"
            )
        self.resolved = resolved
        self.shape = resolved.model.shape
        self.trainable = trainable
        init_process_groups(layout)
        # Seeds megatron's RNG tracker (CPU generators via cpu_compat) for dropout in TP regions.
        mcore_random.model_parallel_cuda_manual_seed(seed)
        self.model = build_gpt_model(resolved.model, seed=seed, layout=layout)
        self.model.requires_grad_(trainable)
        self.steps = 0
        self.optimizer = self.scheduler = None
        if trainable:
            self._build_optimizer()

    # ------------------------------------------------------------------ optimizer

    def _build_optimizer(self) -> None:
        grpo = self.resolved.recipe.grpo
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": grpo.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=grpo.lr,
            betas=tuple(grpo.adam_betas),
            eps=1e-8,
            foreach=False,  # the per-parameter loop is bit-reproducible across runs on CPU
        )
        total = self.resolved.recipe.run.episodes * grpo.steps_per_episode
        if grpo.lr_schedule == "cosine":
            # lr · ½(1 + cos(π·step/total)), no warmup: decays to 0 at the recipe's last step.
            factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        else:
            factor = lambda step: 1.0  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0

    # ------------------------------------------------------------------ forward

    def _forward(self, input_ids: Tensor) -> Tensor:
        """Logits (B, T, V) of megatron's GPTModel; causal, so right padding never reaches real tokens."""
        b, t = input_ids.shape
        position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        return self.model(input_ids, position_ids, attention_mask=None)

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, *, with_entropy: bool = False):
        """Per-token log-probs (B, T-1) fp32 of right-padded ``input_ids`` (B, T), and entropy if asked.

        ``attention_mask`` is accepted for the interface: with right padding and causal attention the real
        tokens never see padding, and values at padded positions are left for the caller to mask.
        """
        was_training = self.model.training
        self.model.eval()
        b, t = input_ids.shape
        rows = max(1, _LOGIT_BUDGET // max(1, t * self.shape.vocab))
        logps, ents = [], []
        for start in range(0, b, rows):
            logp, ent = token_logprobs(
                self._forward(input_ids[start : start + rows]),
                input_ids[start : start + rows],
                with_entropy=with_entropy,
            )
            logps.append(logp)
            ents.append(ent)
        self.model.train(was_training)
        logp = torch.cat(logps)
        return (logp, torch.cat(ents)) if with_entropy else logp

    # ------------------------------------------------------------------ training

    def train_step(self, micro_batches: list[dict[str, Tensor]], loss_fn: LossFn) -> dict[str, float]:
        """Accumulate gradients over ``micro_batches``, clip, step once. See the module docstring.

        ``loss_fn(logp, entropy, mb) -> (loss, metrics)``; the loss is already normalised by the global
        token count, so gradients are summed, not averaged, over micro-batches.
        Raises ``NonFiniteLossError`` before the optimizer step if a loss or the grad norm is not finite.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step on a backend built with trainable=False")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {"loss": 0.0}
        for i, mb in enumerate(micro_batches):
            logits = self._forward(mb["input_ids"])
            logp, entropy = token_logprobs(logits, mb["input_ids"], with_entropy=True)
            loss, metrics = loss_fn(logp, entropy, mb)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError("loss", loss_value, micro_batch=i)
            loss.backward()
            totals["loss"] += loss_value
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.resolved.recipe.grpo.grad_clip)
        )
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError("grad norm", grad_norm)
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm": grad_norm, "lr": lr, **totals}

    # ------------------------------------------------------------------ weights

    def _named_weights(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def hf_named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Weights under HF names (``weight_map``), lazily, for engine weight sync and HF checkpoints."""
        return iter_hf(self._named_weights(), self.shape)

    def load_hf(self, tensors: dict[str, Tensor]) -> None:
        """Initialise the model from an HF state dict (e.g. ``load_hf_checkpoint``'s tensors)."""
        mcore = hf_to_mcore(tensors, self.shape)
        params = dict(self.model.named_parameters())
        if set(mcore) != set(params):
            raise KeyError(f"weight map and model disagree: {sorted(set(mcore) ^ set(params))[:5]}")
        with torch.no_grad():
            for name, value in mcore.items():
                if params[name].shape != value.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(params[name].shape)}"
                    )
                params[name].copy_(value)

    def state_dict(self) -> dict:
        """Model, optimizer, LR schedule, step and RNG states (a copy), for an exact resume."""
        tracker = mcore_random.get_cuda_rng_tracker()
        return copy.deepcopy(
            {
                "model": {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")},
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "steps": self.steps,
                "rng": {"torch": torch.get_rng_state(), "tracker": tracker.get_states()},
            }
        )

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(copy.deepcopy(sd["model"]), strict=False)
        missing = set(dict(self.model.named_parameters())) - set(sd["model"])
        if missing:
            raise KeyError(f"state dict lacks model parameters: {sorted(missing)[:5]}")
        if self.optimizer is not None and sd["optimizer"] is not None:
            self.optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
            self.scheduler.load_state_dict(sd["scheduler"])
        self.steps = sd["steps"]
        torch.set_rng_state(sd["rng"]["torch"])
        mcore_random.get_cuda_rng_tracker().set_states(copy.deepcopy(sd["rng"]["tracker"]))
