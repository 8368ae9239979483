"""The FSDP2 training backend (seed stack E): transformers' own model for the family, sharded with torch's
``fully_shard`` per decoder layer and at the root, over every rank of the job.

For every call the backend takes its share of the episode batch and returns whole-batch results everywhere:

    rows of this DP rank → packed micro-batches (``recipe.fsdp.max_token_in_packing`` tokens, per-row
    position ids) → this rank's slice along the sequence (Ulysses, ``layout.ulysses`` ranks per micro-batch)
    → log-probs / loss on the positions this rank scores → rows of all ranks.

Every rank runs the same number of micro-batches (padding-only ones where it has fewer rows), since FSDP's
all-gathers and reduce-scatters are collectives. The loss is already a global token mean, so gradients are
summed over ranks (gradient divide factor 1), and the grad norm is taken over the shards.

Weights enter and leave under Hugging Face names (the model's own parameter names), whole, per parameter; the
weight sync streams them, one gathered parameter at a time. Checkpoints are torch distributed checkpoints
(DCP) of model and optimizer, each rank writing its shards; ``trainer.convert`` merges them offline
(fsdp-to-hf).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import distribute_tensor

from trainer.backends.base import MakeLossFn, summed_metrics
from trainer.backends.optim import check_finite, clip_and_step, for_training, state_mib
from trainer.models import pretrained
from trainer.models.families import family
from trainer.packing import Packed, budget_groups, empty, pack_rows
from trainer.parallel import dp, ulysses
from trainer.parallel.process_groups import fsdp_meshes
from trainer.parallel.tp import vocab_parallel_logprobs
from trainer.platform import CPU, DTYPES, Platform


def fsdp_dtypes(resolved) -> tuple[str, str]:
    """(parameter dtype in forward/backward, gradient reduction dtype): bf16 / fp32 under ``precision: bf16``
    (the seeds' setting); otherwise the recipe's ``fsdp.param_dtype`` / ``fsdp.reduce_dtype``."""
    if resolved.precision == "bf16":
        return "bf16", "fp32"
    return resolved.recipe.fsdp.param_dtype, resolved.recipe.fsdp.reduce_dtype


def sum_gradients(module: FSDPModule) -> None:
    """The loss is a global mean already: FSDP must sum the gradients, never average them. torch ≥ 2.8: a plain
    SUM (not NCCL's PreMulSum, which gloo lacks) followed by a division by 1. torch 2.6/2.7 (the vLLM image's
    2.6) has neither setter: its divide factor 1 is NCCL's PreMulSum by 1, and leaving it unset would average
    (fp32 gradients divided by the world size). (GPU) not verified here."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    else:
        module.set_reduce_scatter_divide_factor(1.0)


def build_hf_model(resolved, *, on_meta: bool, attention: str = "sdpa") -> torch.nn.Module:
    """transformers' model class of the recipe's family, from the matrix shape (fp32 master weights)."""
    from transformers import AutoModelForCausalLM

    config = family(resolved.model.family).hf_config(resolved.model)
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)


def _reset_rotary(model: torch.nn.Module) -> None:
    """Rotary inverse frequencies are non-persistent buffers: a meta-initialised model must recompute them."""
    for module in model.modules():
        if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
            inv_freq, module.attention_scaling = module.rope_init_fn(module.config, module.inv_freq.device)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq


def every_expert_in_backward(model: torch.nn.Module) -> None:
    """transformers' MoE blocks run only the experts some token chose, so ranks would reduce-scatter gradients
    of different sets of experts and FSDP's collectives would not match. Each block's output gets
    ``0 · Σ expert(no tokens)``: the same values, and a (zero) gradient for every expert on every rank."""

    def touch(block, _args, output):
        rest = output[1:] if isinstance(output, tuple) else ()
        hidden = output[0] if isinstance(output, tuple) else output
        empty = hidden.new_zeros((0, hidden.shape[-1]))
        zero = sum(expert(empty).sum() for expert in block.experts)
        return (hidden + zero, *rest) if rest else hidden + zero

    for module in model.modules():
        if isinstance(getattr(module, "experts", None), torch.nn.ModuleList):
            module.register_forward_hook(touch)


class FSDPBackend:
    """Policy (or reference) model + optimizer on FSDP2, for a resolved matrix recipe."""

    def __init__(self, resolved, *, seed: int, trainable: bool = True, initial: dict[str, Tensor] | None = None,
                 weights: Path | None = None, platform: Platform = CPU):
        self.resolved = resolved
        self.platform = platform
        self.shape = resolved.model.shape
        self.meshes = fsdp_meshes()
        self.sp = resolved.layout.ulysses
        if self.sp > 1:
            ulysses.register()
        torch.manual_seed(seed)
        # Without given weights every rank draws the same initialisation from the seed; with them (``initial`` or
        # a pretrained ``weights`` directory), nothing is allocated before sharding (meta device) and each rank
        # keeps only its shard of each tensor.
        given = initial is not None or weights is not None
        self.model = build_hf_model(resolved, on_meta=given, attention=ulysses.ATTENTION if self.sp > 1 else "sdpa")
        every_expert_in_backward(self.model)
        self._shard()
        if given:
            self.model.to_empty(device=platform.device)
            _reset_rotary(self.model)
            if initial is not None:
                self.load_hf(initial)
            else:
                self.load_pretrained(weights)
        self.optimizer, self.scheduler = for_training(self.model, resolved, trainable=trainable)
        self.steps = 0

    @staticmethod
    def stochastic_forward(resolved) -> bool:
        config = family(resolved.model.family).hf_config(resolved.model)
        return bool(getattr(config, "attention_dropout", 0.0) or getattr(config, "hidden_dropout", 0.0))

    def _shard(self) -> None:
        policy = self.platform.fsdp_policy(*fsdp_dtypes(self.resolved))
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=self.meshes.shard, mp_policy=policy)
        fully_shard(self.model, mesh=self.meshes.shard, mp_policy=policy)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                sum_gradients(module)

    def _resharded(self):
        """The model with every parameter sharded again: a forward without backward leaves the root's parameters
        (embeddings, final norm, head) gathered, as plain tensors, until the next reshard."""
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return self.model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0

    # ------------------------------------------------------------------ batches

    def _rows(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This DP group's share of the rows (a Ulysses group shares its rows)."""
        return dp.rows_of_rank(batch, self.meshes.dp_size, self.meshes.dp_rank)

    def _slice(self, packed: Packed) -> Packed:
        """This rank's slice of a packed micro-batch along the sequence (the whole of it without Ulysses)."""
        return packed.part(dist.get_rank(self.meshes.sp_group), self.sp)

    def _micro_batches(self, rows: dict[str, Tensor]) -> list[tuple[dict[str, Tensor], Packed]]:
        """Packed micro-batches of ``rows``, as many on every rank (padding-only ones where this rank has fewer)."""
        columns = rows["input_ids"].shape[1] - 1
        budget = self.resolved.recipe.fsdp.max_token_in_packing
        lengths = rows["attention_mask"].sum(dim=1).tolist()
        mbs = []
        for group in budget_groups(lengths, budget):
            mb = {k: v[group] for k, v in rows.items()}
            mbs.append((mb, pack_rows(mb["input_ids"], [lengths[i] for i in group], multiple=self.sp)))
        count = torch.tensor([len(mbs)])
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        while len(mbs) < int(count):
            mbs.append((None, empty(self.sp, columns, self.platform.device)))
        return mbs

    def _forward(self, packed: Packed) -> tuple[Packed, Tensor]:
        """Logits (1, width/sp, V) of this rank's slice of a packed micro-batch, and that slice."""
        mine = self._slice(packed)
        scope = (ulysses.whole_sequence(packed.position_ids, self.meshes.sp_group) if self.sp > 1
                 else contextlib.nullcontext())
        with scope:
            logits = self.model(input_ids=mine.input_ids, position_ids=mine.position_ids, use_cache=False).logits
        return mine, logits

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def logprobs(self, batch: dict[str, Tensor], *, micro_batch_size: int) -> Tensor:
        """Per-token log-probs (B, T-1) fp32 of the right-padded batch on every rank; 0 at padded positions.

        ``micro_batch_size`` is unused: micro-batches are packed by ``recipe.fsdp.max_token_in_packing``.
        """
        was_training = self.model.training
        self.model.eval()
        batch = self.platform.to_device(batch)
        parts = []
        for mb, packed in self._micro_batches(self._rows(batch)):
            mine, logits = self._forward(packed)
            logp, _ = vocab_parallel_logprobs(logits, mine.labels, self.shape.vocab, with_entropy=False)
            if mb is not None:
                parts.append(mine.unpack(logp))
        self._resharded().train(was_training)
        return self._whole_batch(parts, batch["input_ids"].shape[1] - 1)

    def _whole_batch(self, parts: list[Tensor], width: int) -> Tensor:
        """This rank's micro-batch log-probs (the positions it scores) → the whole batch's (B, T-1). Collective."""
        mine = torch.cat(parts) if parts else torch.zeros(0, width, device=self.platform.device)
        if self.sp > 1:  # each position is scored by exactly one rank of the Ulysses group
            dist.all_reduce(mine, group=self.meshes.sp_group)
        gathered: list = [None] * self.meshes.dp_size
        # through host memory: a pickled device tensor comes back on its sender's device index
        dist.all_gather_object(gathered, self.platform.to_host(mine), group=self.meshes.dp_sp.get_group("dp"))
        return torch.cat(gathered).to(self.platform.device)

    # ------------------------------------------------------------------ training

    def train_step(self, batch: dict[str, Tensor], make_loss: MakeLossFn, *, micro_batch_size: int,
                   return_logprobs: bool = False) -> dict[str, float] | tuple[dict[str, float], Tensor]:
        """Accumulate gradients over this rank's packed micro-batches, clip over the shards, step once.
        ``return_logprobs``: also the detached log-probs of this forward (before the update), as ``logprobs``."""
        if self.optimizer is None:
            raise RuntimeError("train_step on a backend built with trainable=False")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.platform.to_device(batch)
        mbs = self._micro_batches(self._rows(batch))
        count = torch.zeros(1, dtype=torch.float64, device=self.platform.device)
        for mb, packed in mbs:
            if mb is not None:
                count += (mb["response_mask"] * self._slice(packed).owned()).sum()
        dist.all_reduce(count)
        loss_fn = make_loss(float(count))
        per_micro_batch = []
        forward_logprobs = []
        for mb, packed in mbs:
            mine, logits = self._forward(packed)
            if mb is None:
                (logits.sum() * 0.0).backward()  # FSDP's reduce-scatter runs in backward on every rank
                continue
            logp, entropy = vocab_parallel_logprobs(logits, mine.labels, self.shape.vocab, with_entropy=True)
            inputs = mb | {"response_mask": mb["response_mask"] * mine.owned()}  # the positions this slice scores
            loss, metrics = loss_fn(mine.unpack(logp), mine.unpack(entropy), inputs)
            loss.backward()
            forward_logprobs.append(mine.unpack(logp.detach()))
            per_micro_batch.append({"loss": loss.detach(), **metrics})
        totals = _sum_over_ranks(summed_metrics(per_micro_batch))
        check_finite("loss", totals.get("loss", 0.0), self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = self._grad_norm(params)
        lr = clip_and_step(grad_norm, self.resolved.recipe.grpo.grad_clip, self.optimizer, self.scheduler)
        self.steps += 1
        stats = {"grad_norm": grad_norm, "lr": lr, "memory/optimizer_state_mib": state_mib(self.optimizer), **totals}
        if return_logprobs:
            return stats, self._whole_batch(forward_logprobs, batch["input_ids"].shape[1] - 1)
        return stats

    @staticmethod
    def _grad_norm(params: list[Tensor]) -> float:
        """Global L2 norm of the gradients: squares of each rank's shards, summed over ranks."""
        square = torch.zeros(1, dtype=torch.float64, device=params[0].grad.device if params else None)
        for p in params:
            square += p.grad.to_local().double().pow(2).sum()
        dist.all_reduce(square)
        return float(square.sqrt())

    # ------------------------------------------------------------------ weights

    def whole_weights(self) -> dict[str, Tensor]:
        """Whole weights under HF names on the driver rank ({} elsewhere). Collective."""
        return dict(self.hf_named_tensors())

    @torch.no_grad()
    def hf_named_tensors(self, compute_dtype: bool = False) -> Iterator[tuple[str, Tensor]]:
        """Whole weights under HF names, gathered one parameter per step of the iteration: the driver gets each
        (and should drop it before taking the next), the other ranks get nothing. Every rank must exhaust the
        iterator, since each gather is collective. ``compute_dtype``: each shard is cast to the forward's dtype
        before the gather (a bf16 run's fp32 masters would double the gather and the sync, and a hub-sized
        embedding in fp32 outgrows the seeds' sync buckets)."""
        driver = dist.get_rank() == 0
        dtype = DTYPES[fsdp_dtypes(self.resolved)[0]] if compute_dtype else None
        for name, p in self._resharded().named_parameters():
            whole = (p if dtype is None else p.to(dtype)).full_tensor()
            if driver:
                yield name, whole
            del whole  # before the next gather: one whole parameter at a time

    def load_hf(self, tensors: Mapping[str, Tensor]) -> None:
        """Take this rank's shard of each whole HF-named tensor (a tied ``lm_head.weight`` may be absent)."""
        params = dict(self._resharded().named_parameters())
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise KeyError(f"weights lack {len(missing)} parameter(s) of the model, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                whole = tensors[name]
                if tuple(whole.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: weights have shape {tuple(whole.shape)}, the model {tuple(p.shape)}")
                p.copy_(distribute_tensor(whole.to(p.dtype), p.device_mesh, p.placements))

    def load_pretrained(self, directory: Path) -> None:
        """Start from a pretrained weights directory (``trainer.models.pretrained``). Streamed: every rank reads
        each whole HF-named tensor in turn (the lazy mapping reads it from its safetensors file when asked)
        and keeps only its shard of it, so no rank ever holds the whole model."""
        self.load_hf(pretrained.hf_tensors(directory, self.resolved.model))

    def copy_weights_from(self, other: FSDPBackend) -> None:
        with torch.no_grad():
            for p, q in zip(self._resharded().parameters(), other._resharded().parameters(), strict=True):
                p.to_local().copy_(q.to_local())

    def weights_finite(self) -> bool:
        ok = torch.tensor([float(all(bool(torch.isfinite(p.to_local()).all()) for p in self._resharded().parameters()))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    # ------------------------------------------------------------------ checkpoints

    def _sharded_state(self) -> dict:
        """Model (and optimizer) state as DTensors under the model's FQNs: what DCP writes, each rank its shards."""
        model = self._resharded()
        if self.optimizer is None:
            return {"model": get_model_state_dict(model)}
        weights, optimizer = get_state_dict(model, self.optimizer)
        return {"model": weights, "optimizer": optimizer}

    def save(self, directory: Path) -> dict:
        """Model and optimizer into ``directory`` as a torch distributed checkpoint (each rank writes its shards,
        rank 0 the metadata); returns this rank's own state: LR schedule, step count and RNG. Collective."""
        dcp.save(self._sharded_state(), checkpoint_id=directory)
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else None, "steps": self.steps,
                "rng": self.platform.rng_state()}

    def load(self, directory: Path, own: dict) -> None:
        """Restore what ``save`` wrote into ``directory`` and returned as ``own``. Collective."""
        state = self._sharded_state()
        dcp.load(state, checkpoint_id=directory)  # in place, into this rank's shards
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
            self.scheduler.load_state_dict(own["scheduler"])
        self.steps = own["steps"]
        self.platform.set_rng_state(own["rng"])


def _sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Metrics summed over every rank (each token is scored by exactly one rank). Keys agree on all ranks."""
    keys = sorted(values)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    keys = sorted(set().union(*gathered))
    vector = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
    dist.all_reduce(vector)
    return dict(zip(keys, vector.tolist(), strict=True))
