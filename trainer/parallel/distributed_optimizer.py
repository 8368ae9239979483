"""The distributed optimizer (megatron's ``use_distributed_optimizer``, ZeRO stage 1): each data-parallel rank
keeps optimizer state (AdamW moments, and under bf16 the fp32 main parameters) for its share of the parameters only.

Every rank still sums the full gradients over its data-parallel group (``dp.all_reduce_grads``) and takes the
global grad norm from them, so clipping is unchanged; then each rank steps only the parameters it owns and sends
them to the other ranks of its group (a broadcast per owner and dtype, of its parameters flattened). Each
parameter is stepped by one rank with the same summed gradient and the same arithmetic as without sharding, so
the weights are bit for bit those of the unsharded optimizer; the state per rank is ~1/DP of it (the fp32 main
parameters and two moments: 12 bytes per parameter in bf16, 8 in fp32).

Dense parameters are shared over the DP×CP group, expert parameters over the expert-data-parallel group (they
are summed over those groups too). Ownership is whole parameters, given out largest first to the least-loaded
rank of the group: the same on every rank, since the ranks of one group hold parameters of the same shapes.
The state is saved per rank (each rank file holds its owner's state), so a resume needs the same layout, which
the run directory already requires.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.parallel import dp


def _owners(sizes: Sequence[int], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first, each to the rank holding the fewest elements so far
    (lowest rank on ties), so that the shares differ by at most one parameter's size."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(ranks), key=lambda r: load[r])
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


@dataclass
class _GroupShare:
    """The parameters shared over one process group, by owner: ``by_owner[r]`` are those rank ``r`` of ``group``
    steps, in model order."""

    group: dist.ProcessGroup
    by_owner: list[list[Tensor]]

    def broadcast_from_owners(self) -> None:
        for rank in range(dist.get_world_size(self.group)):
            self.broadcast_from(rank)

    @torch.no_grad()
    def broadcast_from(self, rank: int) -> None:
        """Rank ``rank``'s parameters, flattened per dtype, to the other ranks of the group."""
        mine = self.by_owner[rank]
        for dtype in sorted({p.dtype for p in mine}, key=str):
            same = [p for p in mine if p.dtype == dtype]
            flat = torch.cat([p.detach().reshape(-1) for p in same])  # the owner's values; overwritten elsewhere
            dist.broadcast(flat, src=dist.get_global_rank(self.group, rank), group=self.group)
            offset = 0
            for p in same:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


class OptimizerShares:
    """Which parameters this rank's optimizer steps, and how the others get their new values after a step.

    ``OptimizerShares.of(params, sharded=False)`` owns everything and shares nothing: the plain optimizer.
    """

    def __init__(self, shares: list[_GroupShare], owned: list[Tensor]):
        self._shares = shares
        self.owned = owned
        """The parameters this rank's optimizer is built over (model order)."""

    @classmethod
    def of(cls, params: Iterable[Tensor], *, sharded: bool) -> OptimizerShares:
        params = list(params)
        if not sharded:
            return cls([], params)
        # Shared over the group its gradient is summed over. Every rank of a group holds parameters of the same
        # kinds in the same order, so the groups come in the same order on each (the broadcasts' order).
        by_group: dict[dist.ProcessGroup, list[Tensor]] = {}
        for p in params:
            by_group.setdefault(dp.grad_group(p), []).append(p)
        shares = []
        for group, members in by_group.items():
            ranks = dist.get_world_size(group)
            if ranks > 1:
                owner = _owners([p.numel() for p in members], ranks)
                shares.append(_GroupShare(group, [[p for p, o in zip(members, owner, strict=True) if o == rank]
                                                  for rank in range(ranks)]))
        elsewhere = {id(p) for share in shares for rank, mine in enumerate(share.by_owner)
                     if rank != dist.get_rank(share.group) for p in mine}
        return cls(shares, [p for p in params if id(p) not in elsewhere])

    def share_updates(self) -> None:
        """After the optimizer stepped this rank's parameters: every rank gets every owner's new values.
        Collective over each group."""
        for share in self._shares:
            share.broadcast_from_owners()
