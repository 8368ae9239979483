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


def _after_row(episode, act):
    from trainer.metrics import MetricsLog

    original = MetricsLog.log

    def log(self, logged, row):
        original(self, logged, row)
        if logged == episode:
            act()

    MetricsLog.log = log


def ctrl_c_after_row_1():
    """Ctrl-C in the terminal once episode 1 is logged: SIGINT to the whole process group (launcher and ranks)."""
    _after_row(1, lambda: os.killpg(os.getpgrp(), signal.SIGINT))


def ctrl_c_twice_after_row_1():
    def twice():
        os.killpg(os.getpgrp(), signal.SIGINT)
        os.killpg(os.getpgrp(), signal.SIGINT)

    _after_row(1, twice)


def sigterm_to_group_after_row_1():
    """A scheduler's SIGTERM to the job's whole process group (Slurm's cancel, GNU timeout): launcher and ranks."""
    _after_row(1, lambda: os.killpg(os.getpgrp(), signal.SIGTERM))


def sigterm_to_launcher_after_row_1():
    """A scheduler's SIGTERM to the job's process (the launcher; in a one-process run, the rank itself)."""
    from trainer.parallel.ranks import rank_and_world

    _, world = rank_and_world()
    _after_row(1, lambda: os.kill(_launcher_pid() if world > 1 else os.getpid(), signal.SIGTERM))


def _launcher_pid() -> int:
    """The local launcher's process: the parent of the fork server this rank was forked from."""
    import psutil

    return psutil.Process(os.getppid()).ppid()


def deadlock_after_row_1():
    """The main thread blocks for good once episode 1 is logged: a lock taken twice (a deadlock, GIL released)."""
    import threading

    def deadlock():
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()

    _after_row(1, deadlock)


def rank_1_stops_after_episode_2():
    """Rank 1 stops itself (SIGSTOP, as Ctrl-Z or a debugger would) after its beat of episode 2: a stuck rank
    whichever launcher started it (the test cannot reach a Ray actor's process from outside)."""
    from trainer import heartbeat
    from trainer.parallel.ranks import rank_and_world

    original, beats = heartbeat.beat, []

    def beat():
        original()
        beats.append(None)
        if rank_and_world()[0] == 1 and len(beats) == 3:  # the first beat comes before episode 1
            os.kill(os.getpid(), signal.SIGSTOP)

    heartbeat.beat = beat
