"""Weight-sync buckets: a stream of HF-named tensors packed into flat byte buffers of bounded size.

An engine in another process receives the policy's weights one bucket at a time (``rollout.sync_bucket_mb``):
each bucket is one contiguous uint8 buffer (shared memory when sent through ``torch.multiprocessing``; SGLang's
``FlattenedTensorBucket`` is the same idea) plus, per tensor, its name, dtype, shape and byte offset. The sender
holds a bucket's tensors until the bucket is full, then packs them into the buffer (sized to what it holds) and
drops them; the receiver rebuilds the tensors as views of the buffer, without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

ALIGN = 64  # bytes: every tensor starts at a multiple, so a view of any dtype over the buffer is aligned
MB = 2**20


class BucketTooSmall(ValueError):
    """One tensor alone is larger than the bucket bound."""


@dataclass
class FlatBucket:
    """``buffer`` (uint8, 1-D) holds the tensors of ``entries`` = [(name, dtype, shape, offset)]."""

    buffer: Tensor
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def tensors(self) -> list[tuple[str, Tensor]]:
        """The tensors, as views of ``buffer``."""
        out = []
        for name, dtype, shape, offset in self.entries:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append((name, self.buffer[offset : offset + size].view(dtype).view(shape)))
        return out


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _packed(pending: list[tuple[str, Tensor]]) -> FlatBucket:
    entries, used = [], 0
    for name, tensor in pending:
        offset = _aligned(used)
        entries.append((name, tensor.dtype, tuple(tensor.shape), offset))
        used = offset + tensor.numel() * tensor.element_size()
    buffer = torch.empty(used, dtype=torch.uint8)
    for (_, _, _, offset), (_, tensor) in zip(entries, pending, strict=True):
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat)
    return FlatBucket(buffer, entries)


def flat_buckets(
    named_tensors: Iterable[tuple[str, Tensor]], limit_bytes: int, setting: str = "rollout.sync_bucket_mb"
) -> Iterator[FlatBucket]:
    """Buckets of at most ``limit_bytes`` each (sized to what they hold), in stream order; raises BucketTooSmall
    (naming ``setting``) when a tensor alone does not fit."""
    pending: list[tuple[str, Tensor]] = []
    used = 0
    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        if size > limit_bytes:
            raise BucketTooSmall(
                f"{setting}={limit_bytes / MB:.3g}: tensor {name} alone is {size / MB:.3g} MB; "
                f"set {setting} to at least {math.ceil(size / MB * 100) / 100:g}"
            )
        if _aligned(used) + size > limit_bytes:
            yield _packed(pending)
            pending, used = [], 0
        pending.append((name, tensor))
        used = _aligned(used) + size
        del tensor
    if pending:
        yield _packed(pending)
