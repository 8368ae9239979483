"""The megatron-core training backend: log-probs, train steps and weights of this rank's part of the model.

The model is megatron-core's ``GPTModel`` (``trainer.models.build``) with the layout's TP/PP/CP/EP degrees;
process groups were set up by the entry point. For every call the backend takes its share of the episode
batch and returns whole-batch results on every rank:

    rows of this DP rank → micro-batches → pad to 2·CP, labels from the full sequence, CP chunks
    → megatron's pipeline schedule (PP) → vocab-parallel log-probs (TP) → loss / per-token outputs
    → CP chunks back in sequence order → broadcast from the last PP stage → rows of all DP ranks.

Gradients are summed over DP×CP (the loss is already a global token mean), the grad norm is taken over
distinct shards (``_grad_norm``), and weights leave as whole tensors (``trainer.parallel.gather``).

Optimizer: torch ``AdamW`` with a global-norm clip. megatron-core's ``get_megatron_optimizer`` does not run
on CPU in 0.16.1 (``FP32Optimizer`` allocates its loss scale with ``device='cuda'``, and grad-norm clipping
goes through CUDA multi-tensor kernels), so the backend uses torch's (``trainer.backends.optim``, shared with
FSDP2), with megatron's convention of no weight decay on biases and norm weights (1-D parameters). In bf16
(``precision: bf16``) it steps fp32 main copies of the bf16 parameters, as megatron's mixed-precision
optimizer does; gradients are accumulated and reduced in the parameters' dtype (megatron's default,
``grad_reduce_in_fp32: false``) and clipped in fp32. ``run.distributed_optimizer`` shards that optimizer over
the data-parallel ranks (``trainer.parallel.distributed_optimizer``).

The platform (``trainer.platform``, chosen by the entry point) decides where the model lives and how it is
built; the batch is moved to its device once per call (a no-op when the loop already put it there).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mcore_random
from torch import Tensor

from trainer.backends.base import MakeLossFn, summed_metrics
from trainer.backends.optim import check_finite, clip_and_step, for_training, state_mib, weights_loaded
from trainer.batching import micro_batches
from trainer.models import pretrained
from trainer.models.build import build_gpt_model
from trainer.models.weight_map import hf_to_mcore, stream_hf
from trainer.parallel import cp, dp, gather, pp
from trainer.parallel.distributed_optimizer import OptimizerShares
from trainer.parallel.tp import vocab_parallel_logprobs
from trainer.platform import CPU, Platform

# Per-token (B, T-1) inputs of the loss, sharded along T like the tokens.
PER_TOKEN = ("response_mask", "old_logprobs", "ref_logprobs", "engine_logprobs")


class MegatronBackend:
    """Policy (or reference) model + optimizer on megatron-core, for a resolved matrix recipe."""

    def __init__(self, resolved, *, seed: int, trainable: bool = True, initial: dict[str, Tensor] | None = None,
                 weights: Path | None = None, platform: Platform = CPU):
        self.resolved = resolved
        self.shape = resolved.model.shape
        self.trainable = trainable
        self.platform = platform
        self.optimizer = self.scheduler = None
        # Seeds megatron's RNG tracker (CPU generators via cpu_compat on the CPU platform) for dropout in TP regions.
        mcore_random.model_parallel_cuda_manual_seed(seed)
        self.model = build_gpt_model(resolved.model, seed=seed, layout=resolved.layout, recompute=resolved.recompute,
                                     platform=platform, precision=resolved.precision)
        if initial is not None:
            self.load_hf(initial)
        elif weights is not None:
            self.load_pretrained(weights)
        self.shares = OptimizerShares.of(self.model.parameters(),
                                         sharded=trainable and resolved.recipe.run.distributed_optimizer)
        self.optimizer, self.scheduler = for_training(self.model, resolved, trainable=trainable,
                                                      parameters=self.shares.owned)
        self.steps = 0

    @staticmethod
    def stochastic_forward(resolved) -> bool:
        from trainer.models.families import family

        config = family(resolved.model.family).transformer_config(resolved.model, resolved.layout)
        return bool(config.hidden_dropout or config.attention_dropout or getattr(config, "moe_input_jitter_eps", None))

    # ------------------------------------------------------------------ optimizer

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0

    # ------------------------------------------------------------------ one micro-batch on this rank

    def _micro_batches(self, rows: dict[str, Tensor], size: int) -> list[dict]:
        """This rank's rows in micro-batches, each remembering its real rows and width (before any padding)."""
        if not rows["input_ids"].shape[0]:
            return []
        mbs = [mb | {"rows": mb["input_ids"].shape[0], "width": mb["input_ids"].shape[1]}
               for mb in micro_batches(rows, size)]
        grpo = self.resolved.recipe.grpo
        return [self._local(mb) for mb in pp.uniform(mbs, size, grpo.max_prompt_len + grpo.max_response_len)]

    def _local(self, mb: dict) -> dict:
        """This rank's CP chunks of a micro-batch: tokens, labels (from the full sequence), per-token inputs."""
        # CP chunks, and with sequence parallelism each chunk split again over TP
        sp = ps.get_tensor_model_parallel_world_size() if self.model.config.sequence_parallel else 1
        ids = cp.pad_to_unit(mb["input_ids"], cp.sequence_unit() * sp, 0)
        local = {"input_ids": cp.shard(ids), "labels": cp.shard_labels(ids)}
        for key in PER_TOKEN:
            if key in mb:  # (B, T-1): position t scores token t+1, as the labels do
                local[key] = cp.shard(F.pad(mb[key], (0, ids.shape[1] - mb[key].shape[1])))
        for key, value in mb.items():
            local.setdefault(key, value)
        return local

    def _forward(self, model, mb: dict[str, Tensor]) -> Tensor:
        tokens = mb["input_ids"]
        positions = cp.local_positions(tokens.shape[1] * cp.size(), cp.size(), cp.rank(), tokens.device)
        positions = positions.expand(tokens.shape[0], -1)
        return model(tokens, positions, attention_mask=None)

    def _run(self, mbs: list[dict], finish, *, forward_only: bool) -> list:
        if not mbs:
            return []
        return pp.run(self.model, mbs, lambda model, mb: (self._forward(model, mb), lambda out: finish(out, mb)),
                      forward_only=forward_only)

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Tensor], *, micro_batch_size: int) -> Tensor:
        """Per-token log-probs (B, T-1) fp32 of the right-padded batch; every rank gets the whole batch.

        Values at padded positions are left for the caller to mask (causal: real tokens never see padding).
        """
        was_training = self.model.training
        self.model.eval()
        vocab = self.shape.vocab

        def finish(logits, mb):
            logp, _ = vocab_parallel_logprobs(logits, mb["labels"], vocab, with_entropy=False)
            return logp.new_zeros(()), {"logp": _rows_in_order(logp, mb)}

        batch = self.platform.to_device(batch)
        results = self._run(self._micro_batches(dp.rows_of_rank(batch), micro_batch_size), finish, forward_only=True)
        self.model.train(was_training)
        return _whole_batch([r["logp"] for r in results], batch["input_ids"])

    # ------------------------------------------------------------------ training

    def train_step(self, batch: dict[str, Tensor], make_loss: MakeLossFn, *, micro_batch_size: int,
                   return_logprobs: bool = False) -> dict[str, float] | tuple[dict[str, float], Tensor]:
        """Accumulate gradients over this rank's micro-batches, sum them over DP×CP, clip, step once.

        ``make_loss(global_tokens)`` builds the per-micro-batch loss, normalised by the response tokens of
        the whole batch (``dp.global_token_count``). Raises ``NonFiniteLossError`` before the optimizer
        step if the loss or the grad norm is not finite. ``return_logprobs``: also return the detached
        log-probs of this forward (before the update), assembled as ``logprobs`` assembles its own.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step on a backend built with trainable=False")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)  # with a distributed optimizer, the parameters it does not step too
        batch = self.platform.to_device(batch)
        mbs = self._micro_batches(dp.rows_of_rank(batch), micro_batch_size)
        local_mask = (torch.cat([mb["response_mask"].flatten() for mb in mbs]) if mbs
                      else torch.zeros(0, device=self.platform.device))
        loss_fn = make_loss(dp.global_token_count(local_mask))
        vocab = self.shape.vocab

        def finish(logits, mb):
            logp, entropy = vocab_parallel_logprobs(logits, mb["labels"], vocab, with_entropy=True)
            loss, metrics = loss_fn(logp, entropy, mb)
            result = {"loss": loss.detach(), **metrics}
            return loss, result | ({"logp": _rows_in_order(logp.detach(), mb)} if return_logprobs else {})

        results = self._run(mbs, finish, forward_only=False)
        logprobs = _whole_batch([r.pop("logp") for r in results], batch["input_ids"]) if return_logprobs else None
        totals = dp.sum_over_dp_cp(pp.from_last_stage(summed_metrics(results)))
        check_finite("loss", totals.get("loss", 0.0), self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        _sync_tied_embeddings(params)
        dp.sum_tp_partial_grads([(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
                                self.model.config)
        dp.all_reduce_grads(params)
        _update_routers(self.model)
        grad_norm = _grad_norm(params)
        lr = clip_and_step(grad_norm, self.resolved.recipe.grpo.grad_clip, self.optimizer, self.scheduler)
        self.shares.share_updates()
        self.steps += 1
        stats = {"grad_norm": grad_norm, "lr": lr, "memory/optimizer_state_mib": state_mib(self.optimizer), **totals}
        return (stats, logprobs) if return_logprobs else stats

    # ------------------------------------------------------------------ weights

    def whole_weights(self) -> dict[str, Tensor]:
        return gather.whole_tensors(self.model, self.shape.vocab)

    def hf_named_tensors(self, compute_dtype: bool = False) -> Iterator[tuple[str, Tensor]]:
        """Whole weights under HF names on the driver rank (nothing elsewhere), one megatron tensor at a time
        (``gather.stream_whole_tensors``); every rank must exhaust the iterator, as each step may be collective.
        The model's parameters are in its compute dtype already (a bf16 run's fp32 masters live in the
        optimizer)."""
        stream = gather.stream_whole_tensors(self.model, self.shape.vocab)
        return stream_hf(stream, self.shape) if dist.get_rank() == 0 else stream

    def load_whole(self, whole: Mapping[str, Tensor]) -> None:
        """Take this rank's shard of whole megatron-named weights, one parameter at a time (``whole`` may read
        each tensor only when asked), and the buffers ``whole`` has (a router's expert bias)."""
        self._copy_in(gather.local_tensors_and_buffers(self.model, whole))
        weights_loaded(self.optimizer)

    def load_pretrained(self, directory: Path) -> None:
        """Start from a pretrained weights directory (``trainer.models.pretrained``), streamed tensor by tensor:
        each of this rank's parameters reads its one whole tensor and keeps its shard, or its own file's piece."""
        self._copy_in(pretrained.megatron_shards(directory, self.model, self.resolved.model))
        weights_loaded(self.optimizer)

    @staticmethod
    def _copy_in(pairs: Iterator[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for target, value in pairs:
                if target.shape != value.shape:
                    raise ValueError(f"checkpoint shape {tuple(value.shape)} != model {tuple(target.shape)}")
                target.copy_(value)

    def load_hf(self, tensors: dict[str, Tensor]) -> None:
        """Initialise the model from an HF state dict (e.g. ``load_hf_checkpoint``'s tensors)."""
        self.load_whole(hf_to_mcore(tensors, self.shape))

    def copy_weights_from(self, other: MegatronBackend) -> None:
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), other.model.parameters(), strict=True):
                p.copy_(q)

    def weights_finite(self) -> bool:
        ok = torch.tensor([float(all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _live_state(self) -> dict:
        """This rank's model, optimizer, LR schedule, step and RNG states, as references to the live tensors."""
        tracker = mcore_random.get_cuda_rng_tracker()
        return {
            "model": {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "steps": self.steps,
            "rng": self.platform.rng_state() | {"tracker": tracker.get_states(),
                                                "tracker_device": self.platform.device.type},
        }

    def state_dict(self) -> dict:
        """This rank's state for an exact resume, a copy (training on leaves it as it is)."""
        return copy.deepcopy(self._live_state())

    def save(self, directory: Path) -> dict:
        """All of this rank's state goes into its rank file (``directory`` stays unwritten), uncopied: the
        checkpoint serializes it before training goes on, and a copy would hold a second model and optimizer
        state on the device (~18 bytes per parameter of a bf16 run) at every checkpoint."""
        return self._live_state()

    def load(self, directory: Path, own: dict) -> None:
        self.load_state_dict(own)

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(copy.deepcopy(sd["model"]), strict=False)
        missing = set(dict(self.model.named_parameters())) - set(sd["model"])
        if missing:
            raise KeyError(f"state dict lacks model parameters: {sorted(missing)[:5]}")
        if self.optimizer is not None and sd["optimizer"] is not None:
            self.optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
            self.scheduler.load_state_dict(sd["scheduler"])
        self.steps = sd["steps"]
        self.platform.set_rng_state(sd["rng"])
        # the tracker's generators are the device's: a checkpoint of another device kind (a CPU run resumed on a
        # GPU) has states of another size, which set_states refuses; the run goes on with this device's streams
        if sd["rng"].get("tracker_device", self.platform.device.type) == self.platform.device.type:
            mcore_random.get_cuda_rng_tracker().set_states(copy.deepcopy(sd["rng"]["tracker"]))


def _update_routers(model) -> None:
    """The routers' part of megatron's ``finalize_model_grads``, which this backend's own gradient path replaces:
    an expert bias with an update rate moves by it against this step's token counts (megatron all-reduces them
    over TP×CP×DP), and the counts start again. Collective where a bias is updated."""
    # the module itself: its package exports the function of the same name
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    config = model.config
    if config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate > 0:
        _update_router_expert_bias([model], config)
    reset_model_temporary_tensors(config, [model])


def _rows_in_order(per_token: Tensor, mb: dict) -> Tensor:
    """A micro-batch's per-token values of this rank's CP chunks, in sequence order, without padding (rows, T-1)."""
    return cp.unshard(per_token)[: mb["rows"], : mb["width"] - 1]


def _whole_batch(parts: list[Tensor], input_ids: Tensor) -> Tensor:
    """This rank's micro-batch results (last PP stage) → the whole batch's (B, T-1) on every rank. Collective."""
    mine = pp.from_last_stage(torch.cat(parts) if parts else None)
    return _rows_of_all_dp_ranks(mine, input_ids)


def _rows_of_all_dp_ranks(mine: Tensor | None, input_ids: Tensor) -> Tensor:
    """Concatenate every DP rank's rows (in rank order) into the whole batch's (B, T-1)."""
    if ps.get_data_parallel_world_size() == 1:
        return mine.to(input_ids.device)
    parts: list = [None] * ps.get_data_parallel_world_size()
    # through host memory: a pickled device tensor comes back on its sender's device index
    dist.all_gather_object(parts, None if mine is None else Platform.to_host(mine), group=ps.get_data_parallel_group())
    empty = input_ids.new_zeros((0, input_ids.shape[1] - 1), dtype=torch.float32)
    return torch.cat([p.to(input_ids.device) if p is not None else empty for p in parts])


def _sync_tied_embeddings(params: list[Tensor]) -> None:
    """Tied input/output embeddings split over PP stages: both copies get the sum of their gradients."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return
    for p in params:
        if getattr(p, "shared_embedding", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=ps.get_embedding_group())


def _grad_norm(params: list[Tensor]) -> float:
    """Global L2 norm of the gradients, each distinct shard counted once.

    TP-replicated parameters (norms, biases of row-parallel layers) count on TP rank 0 only; a tied output
    embedding's second copy not at all; dense shards sum over TP×PP, expert shards over ETP×EP×PP.
    """
    device = params[0].device if params else None  # the gradients' device: sums stay where they are
    dense = torch.zeros(1, dtype=torch.float64, device=device)
    expert = torch.zeros(1, dtype=torch.float64, device=device)
    for p in params:
        if getattr(p, "shared", False):  # megatron's mark on the last stage's copy of a tied embedding
            continue
        is_expert = not getattr(p, "allreduce", True)
        tp_rank = ps.get_expert_tensor_parallel_rank() if is_expert else ps.get_tensor_model_parallel_rank()
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            (expert if is_expert else dense).add_(p.grad.double().pow(2).sum())
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    dist.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return float((dense + expert).sqrt())
