"""Errors a training backend raises to the loop."""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm of a step was nan/inf; the optimizer did not step.

    Weights, optimizer state and gradients are left as they were before the step (gradients zeroed), so
    the caller can log, skip the batch or stop with the last good weights.
    """

    def __init__(self, what: str, value: float, *, micro_batch: int | None = None):
        where = f" (micro-batch {micro_batch})" if micro_batch is not None else ""
        super().__init__(f"non-finite {what}{where}: {value}; optimizer step skipped, weights unchanged")
        self.what = what
        self.value = value
        self.micro_batch = micro_batch
