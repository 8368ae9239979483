"""Deterministic kill points planted in a run (``GRPO_STACK_PLANT_FAULT=kill_points.py:NAME``): each replaces one
call of the loop with a SIGKILL of the process at an exact moment, where a timed kill would only sometimes land."""

import os
import signal


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_row_2():
    """Killed after the checkpoint of episode 2 is published, before episode 2's metrics row is written."""
    from trainer.metrics import MetricsLog

    original = MetricsLog.log

    def log(self, episode, row):
        if episode == 2:
            _kill_self()
        return original(self, episode, row)

    MetricsLog.log = log


def kill_in_first_save():
    """Killed as the first checkpoint starts: metrics rows exist, no checkpoint does."""
    from trainer import checkpoint

    def save(*args, **kwargs):
        _kill_self()

    checkpoint.save = save
