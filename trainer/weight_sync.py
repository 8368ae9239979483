"""Weight sync: the policy's whole weights under HF names, streamed into the driver's rollout engine.

The engine consumes the backend's iterator as it is produced, so the driver never has more than one whole
tensor of the stream alive (FSDP2 gathers one parameter per step; megatron-core's owners each hold their share
and send one whole tensor when the driver asks: ``gather.stream_whole_tensors``); the other ranks drain the same
iterator, taking part in every gather and send. An engine in another process receives the stream in bounded
buckets (``rollout.sync_bucket_mb``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor

from trainer.backends.base import TrainingBackend
from trainer.parallel.job import Job
from trainer.rollout.base import RolloutEngine


def sync_weights(policy: TrainingBackend, engine: RolloutEngine | None, job: Job) -> int:
    """Push ``policy``'s weights into ``engine`` (the driver's; None elsewhere); returns the bytes the driver
    sent (0 elsewhere). Collective: every rank calls it."""
    sent = 0

    def counted(tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        nonlocal sent
        for name, tensor in tensors:
            sent += tensor.numel() * tensor.element_size()
            yield name, tensor
            del tensor  # before the next one is gathered

    def load(stream: Iterator[tuple[str, Tensor]]) -> None:
        engine.wake(("weights",))  # a colocated engine: weights first, then the KV cache once they are loaded
        engine.update_weights(stream)
        engine.wake(("kv_cache",))

    stream = counted(policy.hf_named_tensors(compute_dtype=True))  # what the engine serves
    job.on_driver(lambda: load(stream))
    for _ in stream:  # the other ranks take part in every gather (and the driver in any the engine left)
        pass
    return sent
