"""Hooks planted in a pipelined run (``GRPO_STACK_PLANT_FAULT=offpolicy_hooks.py:NAME``) for ``test_offpolicy.py``.

``record``: every checkpoint is kept and every trained batch saved to ``$OFFPOLICY_BATCHES/episode-N.pt``, so the
test can score a batch under the weights that generated it. ``record_then_kill_after_row_3``: the same, then a
SIGKILL once episode 3's row is written (the next generation in flight). ``record_with_stale_fault``: the same,
with a planted fault: the old log-probs of a stale batch taken from the current weights instead of its own.
"""

import os
import signal
from pathlib import Path


def record():
    import torch

    from trainer import checkpoint, pipeline

    checkpoint.KEEP = 1_000
    out = Path(os.environ["OFFPOLICY_BATCHES"])
    original = pipeline.Pipeline.episode

    def episode(self, number, timer):
        if self.in_flight is not None:  # the driver: the batch it is about to train on
            out.mkdir(parents=True, exist_ok=True)
            torch.save(self.in_flight.finish().batch, out / f"episode-{number}.pt")
        return original(self, number, timer)

    pipeline.Pipeline.episode = episode


def record_then_kill_after_row_3():
    from trainer.metrics import MetricsLog

    record()
    original = MetricsLog.log

    def log(self, episode, row):
        original(self, episode, row)
        if episode == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    MetricsLog.log = log


def record_with_stale_fault():
    from trainer import pipeline

    record()
    original = pipeline.logprob_passes
    policies = []
    init = pipeline.Pipeline.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        policies.append(self.policy)

    def from_current_weights(batch, r, old, ref, timer, need):
        return original(batch, r, policies[-1], ref, timer, need)

    pipeline.Pipeline.__init__ = remember
    pipeline.logprob_passes = from_current_weights
