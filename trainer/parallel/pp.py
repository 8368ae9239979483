"""Pipeline parallelism through megatron-core's own schedule (``get_forward_backward_func``: 1F1B).

Every stage receives the same micro-batches; the first stage embeds ``input_ids``, later stages take the
activations the schedule passes them, and the last stage turns logits into per-token log-probs and the loss.
The schedule sums the loss over micro-batches untouched (``calculate_per_token_loss``): our loss is already
normalised by the global token count. Results live on the last stage and are broadcast to the whole PP
group, so every rank returns the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from trainer.platform import Platform

# Settings of megatron's ModelParallelConfig that the CPU/gloo pipeline needs: isend/irecv pairs instead of
# batched p2p (whose sync calls torch.cuda.synchronize), and no division of our already globally-normalised
# loss by the number of micro-batches. Shapes stay fixed (``uniform``): megatron's variable_seq_lengths is
# refused with the allgather MoE dispatcher, the one that runs on gloo.
SCHEDULE_CONFIG = {"batch_p2p_comm": False, "calculate_per_token_loss": True}


def uniform(micro_batches: list[dict], rows: int, width: int) -> list[dict]:
    """With PP > 1, every micro-batch padded to ``rows`` × ``width`` tokens (stages exchange fixed shapes).

    Padding rows and columns hold token 0 with every mask 0, so they add nothing to the loss or gradients.
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return micro_batches
    out = []
    for mb in micro_batches:
        padded = dict(mb)
        for key, value in mb.items():
            if isinstance(value, torch.Tensor):
                shape = list(value.shape)
                shape[0] = rows
                if value.dim() == 2:
                    shape[1] = width if key in ("input_ids", "attention_mask") else width - 1
                full = value.new_zeros(shape)
                full[tuple(slice(0, n) for n in value.shape)] = value
                padded[key] = full
        out.append(padded)
    return out


def run(model: torch.nn.Module, micro_batches: list[dict], step: Callable, *, forward_only: bool) -> list[Any]:
    """Run ``step(model, micro_batch) -> (output, finish)`` over ``micro_batches`` with megatron's schedule.

    ``finish(output) -> (loss, result)`` runs on the last stage; returns the ``result`` of every
    micro-batch there (an empty list on other stages).
    """
    queue = iter(micro_batches)

    def forward_step(data_iterator, model):
        output, finish = step(model, next(data_iterator))

        def loss_func(out):
            loss, result = finish(out)
            return loss, torch.tensor(1, dtype=torch.int), result

        return output, loss_func

    # the schedule's activation shape is [seq/CP, micro-batch, hidden]: it divides by CP itself
    width = micro_batches[0]["input_ids"].shape[1] * parallel_state.get_context_parallel_world_size()
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=queue, model=[model], num_microbatches=len(micro_batches),
        seq_length=width, micro_batch_size=micro_batches[0]["input_ids"].shape[0], forward_only=forward_only,
    )


def from_last_stage(obj: Any) -> Any:
    """``obj`` as the last PP stage has it, on every stage of this pipeline; a tensor crosses in host memory (a
    pickled device tensor would come back on its sender's device) and the caller places it."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [Platform.to_host(obj) if isinstance(obj, torch.Tensor) else obj]
    dist.broadcast_object_list(holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return holder[0]
