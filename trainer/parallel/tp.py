"""Tensor parallelism: per-token log-probs and entropy from vocab-parallel logits, never gathering them.

With ``parallel_output=True`` each TP rank holds logits (B, T, V/TP) of its vocabulary slice
[rank·V/TP, (rank+1)·V/TP). log p(label) = z_label − logsumexp(z) needs two sums over the whole vocabulary,
each an all-reduce over the TP group (megatron's ``reduce_from_tensor_model_parallel_region``: forward
all-reduce, backward identity, since every rank computes the same loss from the reduced value). Ids past the
model's real vocabulary (padding up to a multiple of TP) get logit −inf, so no probability leaks into them.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import Tensor


def padded_vocab(vocab: int, tp: int) -> int:
    """The model's vocabulary rounded up to a multiple of TP (VocabParallelEmbedding splits it evenly)."""
    return -(-vocab // tp) * tp


def reduce_sum(x: Tensor) -> Tensor:
    """Sum over the TP group (differentiable). A module attribute so a gate test can plant a wrong op."""
    return reduce_from_tensor_model_parallel_region(x)


def _reduce_max(x: Tensor) -> Tensor:
    x = x.detach().clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    return x


def vocab_parallel_logprobs(logits: Tensor, labels: Tensor, vocab: int, *, with_entropy: bool
                            ) -> tuple[Tensor, Tensor | None]:
    """log p(labels) (B, T) fp32 from this rank's logit slice (B, T, V/TP); entropy (B, T) if asked.

    ``vocab`` is the real vocabulary size; slice columns past it are padding and masked to −inf.
    """
    logits = logits.float()
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    ids = torch.arange(start, start + width, device=logits.device)
    if start + width > vocab:
        logits = logits.masked_fill(ids >= vocab, float("-inf"))
    top = _reduce_max(logits.max(dim=-1).values)  # constant shift: exact, and no gradient through it
    shifted = logits - top.unsqueeze(-1)
    exp = shifted.exp()
    log_z = reduce_sum(exp.sum(dim=-1)).log()  # log Σ_v exp(z_v − top) over the whole vocabulary

    local = labels - start
    mine = (local >= 0) & (local < width)
    picked = shifted.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    label_logit = reduce_sum(torch.where(mine, picked, torch.zeros_like(picked)))
    logp = label_logit - log_z
    if not with_entropy:
        return logp, None
    # H = log Z − Σ p·z (with the same shift); padding columns contribute exp(−inf)·0 = 0, never 0·inf.
    weighted = torch.where(torch.isfinite(shifted), exp * shifted, torch.zeros_like(shifted)).sum(dim=-1)
    entropy = log_z - reduce_sum(weighted) / log_z.exp()
    return logp, entropy
