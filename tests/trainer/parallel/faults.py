"""Faults planted in a candidate layout's ranks (``python -m trainer.equivalence --plant faults.py:NAME``).

Each replaces one function of the parallel code with a plausible bug of the kind seen in other frameworks
(REFERENCE §7); test_gates_fail.py asserts the gate catches each on the quantity it should.
"""

import torch
import torch.distributed as dist


def label_shift_at_chunk_boundaries():
    """Labels shifted inside each rank's chunks instead of on the full sequence."""
    from trainer.parallel import cp

    cp.shard_labels = lambda input_ids: cp.next_token_labels(cp.shard(input_ids))


def wrong_causal_offset_second_chunk():
    """The second chunk's queries believe they sit one chunk earlier than they do."""
    from trainer.parallel import cp

    original = cp.causal_positions

    def shifted(local_len, device=None):
        queries, keys = original(local_len, device)
        half = local_len // 2
        queries = queries.clone()
        queries[half:] -= half
        return queries, keys

    cp.causal_positions = shifted


def tokens_counted_twice_across_cp():
    """Each CP rank counts the tokens of its whole rows, not of its chunks."""
    from trainer.parallel import cp, dp

    original = dp.global_token_count
    dp.global_token_count = lambda local_mask: original(local_mask) * cp.size()


def loss_scaled_by_cp():
    """The loss multiplied by the CP size (a normalisation applied twice, inverted)."""
    from trainer import episode
    from trainer.parallel import cp

    original = episode.make_loss_fn

    def scaled(grpo, tokens, *passes):
        inner = original(grpo, tokens, *passes)

        def loss_fn(logp, entropy, mb):
            loss, metrics = inner(logp, entropy, mb)
            return loss * cp.size(), metrics

        return loss_fn

    episode.make_loss_fn = scaled


def tp_logprobs_reduced_with_max():
    """The vocab-parallel softmax denominator reduced with MAX instead of SUM over TP ranks."""
    from megatron.core import parallel_state

    from trainer.parallel import tp

    def reduce_max(x):
        y = x.clone()
        dist.all_reduce(y.detach(), op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
        return x + (y - x).detach()

    tp.reduce_sum = reduce_max


def dp_token_count_not_all_reduced():
    """Each DP rank normalises by its own token count."""
    from trainer.parallel import dp

    dp.global_token_count = lambda local_mask: float(local_mask.sum())


def ulysses_sequence_slices_out_of_order():
    """Ulysses reassembles the whole sequence from its ranks' slices in the wrong (reversed) order."""
    from trainer.parallel import ulysses

    original = ulysses._exchange

    def reversed_exchange(x, group, *, split, gather):
        out = original(x, group, split=split, gather=gather)
        return torch.cat(out.chunk(dist.get_world_size(group), dim=gather)[::-1], dim=gather)

    ulysses._exchange = reversed_exchange


def fsdp_gradients_averaged_over_ranks():
    """FSDP left at its default gradient reduction (average over ranks) while the loss is a global mean."""
    from torch.distributed.fsdp import FSDPModule

    FSDPModule.set_gradient_divide_factor = lambda self, factor: None
    FSDPModule.set_force_sum_reduction_for_comms = lambda self, enable: None


def expert_weights_reduced_as_dense():
    """Expert weights left as megatron 0.16.1 marks them with EP 1 (allreduce = True): with ETP < TP their
    gradients are reduced over the dense DP group, missing the TP ranks that saw the other tokens."""
    from trainer.models import build

    build._mark_expert_parameters = lambda model: None


def mla_down_projections_column_parallel():
    """MLA's q/kv down projections split over TP (megatron's local spec): the rope key's gradient stays partial."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from trainer.models.specs import TorchSpecProvider

    TorchSpecProvider.linear = lambda self: ColumnParallelLinear


def tied_embedding_gradients_not_summed():
    """Tied embeddings over PP: each stage steps its own copy with only its own gradient (the input side on the
    first stage, the output side on the last), so the two copies drift apart."""
    from trainer.backends import megatron

    megatron._sync_tied_embeddings = lambda params: None


def distributed_optimizer_last_owner_never_sends():
    """The distributed optimizer's loop over owners stops one short: the last rank of each group steps its share
    but never sends it, so the other ranks keep stale copies of those parameters."""
    from trainer.parallel import distributed_optimizer

    def broadcast_from_owners(self):
        for rank in range(dist.get_world_size(self.group) - 1):
            self.broadcast_from(rank)

    distributed_optimizer._GroupShare.broadcast_from_owners = broadcast_from_owners


__all__ = ["torch"]


def hold_after_the_first_checkpoint():
    """Every rank waits after its first episode (past the episode-1 checkpoint) while the file named by
    GRPO_STACK_TEST_HOLD exists: the two-host test kills a host there, mid-run."""
    import os
    import time

    from trainer import heartbeat

    beat, beats = heartbeat.beat, [0]

    def held_beat():
        beat()
        beats[0] += 1
        while beats[0] >= 2 and os.path.exists(os.environ["GRPO_STACK_TEST_HOLD"]):
            time.sleep(0.2)

    heartbeat.beat = held_beat
