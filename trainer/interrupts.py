"""Ctrl-C and SIGTERM: stop at the next safe point with a checkpoint, not in the middle of a step.

A rank's handler only records the signal; the loop asks every rank at the end of each episode (one small
all-reduce, so all ranks stop after the same episode), checkpoints and raises ``RunInterrupted``. The CLI then
prints one line and exits 128 + the signal (130 for SIGINT, 143 for SIGTERM).

In a multi-process run the launcher's process forwards the signal to every rank (a scheduler's SIGTERM goes to
the launcher only) and, on a second Ctrl-C, kills the ranks and exits at once; a rank ignores repeats (a
terminal's Ctrl-C reaches it both directly and forwarded). A single process is its own launcher: its second
Ctrl-C exits at once.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

SIGNALS = (signal.SIGINT, signal.SIGTERM)
AGENT_SIGNALS = "SIGHUP,SIGQUIT"  # what torch's elastic agent may still handle (its default adds SIGINT, SIGTERM)
_received: int = 0


class RunInterrupted(Exception):
    """The run stopped on a signal after checkpointing ``episode``."""

    def __init__(self, episode: int, signum: int):
        super().__init__(f"interrupted at episode {episode}")
        self.episode, self.signum = episode, signum


def received() -> int:
    """The signal this process got (0: none)."""
    return _received


def _at_once(signum: int) -> None:
    from trainer.console_log import say_now

    say_now(f"\n{signal.Signals(signum).name} again: stopped at once, without a checkpoint\n")
    os._exit(128 + signum)


def _rank_handler(own_process_is_launcher: bool):
    def handle(signum: int, frame) -> None:
        global _received
        if _received and own_process_is_launcher and signum == signal.SIGINT:
            _at_once(signum)
        if not _received:
            _received = signum
            if own_process_is_launcher:  # straight to the terminal, in order with a second Ctrl-C's line
                from trainer.console_log import say_now

                say_now(f"\n{signal.Signals(signum).name}: stopping after this episode with a checkpoint "
                        "(Ctrl-C again to stop at once)\n")

    return handle


def install(world_size: int) -> None:
    """A rank's handlers: record the signal for the loop's next safe point."""
    reset()
    for sig in SIGNALS:
        signal.signal(sig, _rank_handler(own_process_is_launcher=world_size == 1))


def reset() -> None:
    """Forget a recorded signal (tests that run several trainings in one process)."""
    global _received
    _received = 0


class StoppedAtOnce(BaseException):
    """A second Ctrl-C in a launcher that must clean up before it exits (Ray: actors, placement group); the CLI
    prints ``_at_once``'s line and exits 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} again: stopped at once, without a checkpoint")
        self.signum = signum


def send_signal(pids: list[int], signum: int) -> None:
    """``signum`` to each of ``pids`` on this host, those already gone skipped."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def _to_children(signum: int) -> None:
    send_signal([proc.pid for proc in multiprocessing.active_children()], signum)


def _kill_children_and_exit(signum: int) -> None:
    for proc in multiprocessing.active_children():
        proc.kill()
    _at_once(signum)


@contextmanager
def forwarding(deliver: Callable[[int], None] = _to_children,
               at_once: Callable[[int], None] = _kill_children_and_exit) -> Iterator[None]:
    """In the launcher's process while its ranks run: pass a signal on to every rank (``deliver``, by default to
    this process's children); a second Ctrl-C calls ``at_once``, which stops the ranks and exits (or raises
    ``StoppedAtOnce`` for the launcher to clean up). Torch's elastic agent must leave these signals alone
    (``AGENT_SIGNALS``): it would kill the ranks."""
    global _received

    def handle(signum: int, frame) -> None:
        global _received
        if _received and signum == signal.SIGINT:
            at_once(signum)
            return
        _received = _received or signum
        from trainer.console_log import say_now

        say_now(f"\n{signal.Signals(signum).name}: every rank stops after this episode with a checkpoint (Ctrl-C "
                "again to stop at once)\n")
        deliver(signum)

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
