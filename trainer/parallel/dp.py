"""Data parallelism (and the CP half of it): which rows a rank takes, the global token count, gradient sums.

The GRPO loss is a token mean over the GLOBAL batch (REFERENCE §4): each rank's loss is its tokens' sum
divided by the token count of all rows on all DP ranks and all CP chunks, so gradients are SUMMED (never
averaged) over the DP×CP group, and expert gradients over the expert-data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor


def row_slice(rows: int, ranks: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous share of ``rows`` over ``ranks`` (the first ranks take one more when it does
    not divide)."""
    base, extra = divmod(rows, ranks)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rows_of_rank(batch: dict[str, Tensor], ranks: int | None = None, rank: int | None = None) -> dict[str, Tensor]:
    """This DP rank's rows of every (B, ...) tensor; by default of megatron's data-parallel group."""
    if ranks is None:
        ranks, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = row_slice(next(iter(batch.values())).shape[0], ranks, rank)
    return {k: v[rows] for k, v in batch.items()}


def _dp_cp_group():
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def global_token_count(local_mask: Tensor) -> float:
    """Response tokens of the whole step: this rank's (its rows, its CP chunks), summed over DP×CP."""
    count = local_mask.sum().detach().double().reshape(1)
    dist.all_reduce(count, group=_dp_cp_group())
    return float(count)


def sum_over_dp_cp(values: dict[str, float]) -> dict[str, float]:
    """Per-rank partial sums of metrics → the step's totals."""
    if not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=_dp_cp_group())
    return dict(zip(keys, t.tolist(), strict=True))


def sum_tp_partial_grads(named_params: list[tuple[str, torch.nn.Parameter]], config) -> None:
    """Parameters replicated over TP whose gradient each TP rank sees only in part, reduced over TP as
    megatron's ``finalize_model_grads`` does: summed for norms under sequence parallelism (a part of the
    sequence each) and for q/k layernorms (a part of the heads each); averaged where a module asks for it."""
    group = parallel_state.get_tensor_model_parallel_group()
    n = dist.get_world_size(group)
    if n == 1:
        return
    for name, p in named_params:
        if p.grad is None:
            continue
        if getattr(p, "average_gradients_across_tp_domain", False):
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(n)
        elif (config.sequence_parallel and getattr(p, "sequence_parallel", False)) or (
                config.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)):
            dist.all_reduce(p.grad, group=group)


def grad_group(p: torch.nn.Parameter) -> dist.ProcessGroup:
    """The ranks that hold the same shard of ``p`` for different data, over which its gradient is summed: DP×CP
    for a dense parameter, expert-data-parallel for an expert's (megatron marks those ``allreduce = False``)."""
    if getattr(p, "allreduce", True):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_expert_data_parallel_group()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over the ranks that hold the same parameter shard for different data."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        group = grad_group(p)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
