"""A fault planted in the environment, not in the code: on PYTHONPATH, this `sitecustomize` makes every SUM
all-reduce over more than one rank come back 1% too large (a broken collective, as a bad NCCL build or driver
would). No file of the trainer changes, so nothing keyed by the trainer's source can see it."""

import torch.distributed as dist
from torch.distributed import distributed_c10d

_all_reduce = distributed_c10d.all_reduce


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    work = _all_reduce(tensor, op=op, group=group, async_op=async_op)
    if op == dist.ReduceOp.SUM and dist.get_world_size(group) > 1 and tensor.is_floating_point():
        if work is not None:
            work.wait()
        tensor.mul_(1.01)
    return work


dist.all_reduce = distributed_c10d.all_reduce = all_reduce
