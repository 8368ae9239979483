"""A stuck rank ends the run within ``run.stall_timeout_s``, named, instead of after gloo's 30 minutes.

Each rank of a multi-process run beats (touches its file in a private directory the launcher made) whenever it
makes progress: before the first episode and after each one. The launcher watches the files; once no rank has
beaten for the stall timeout, it names the rank that stalled the others (one stopped by a signal or stuck in
the kernel, a hung file system, else one that never beat, else the one whose beat is oldest), stops every rank
and reports that one line. Ranks waiting in a collective for the stuck one stop beating too, which is why the
verdict looks at process states and beat ages rather than at who waited. The process groups' own collective
timeout (``init_process_groups(timeout_s=...)``) is set a little longer, as a backstop.

A one-process run has no launcher process to watch it, so it watches itself (``ProcessWatch``: a thread). What
one process can see of itself: its main thread blocked for good — a deadlock on a lock, a read or a collective
that never returns, any wait that releases the GIL — or a loop that never reaches its next beat. What it cannot:
being stopped (SIGSTOP, Ctrl-Z), when none of its threads runs — a stopped process is paused, not stuck; it goes
on when continued (``fg``, SIGCONT) and the time it was stopped does not count — and a C call that spins holding
the GIL, which stops the watch's thread too. Only a watcher outside the process (the launcher's, for
multi-process runs; a scheduler's time limit) sees those.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

ENV = "GRPO_STACK_HEARTBEAT_DIR"
POLL_S = 1.0
STATES = {"T": "stopped by a signal", "t": "stopped by a debugger",
          "D": "waiting on the kernel (a hung file system or device?)"}


CPU_DEFAULT_S, GPU_DEFAULT_S = 300.0, 1800.0


def stall_timeout_s(resolved) -> float:
    """The recipe's ``run.stall_timeout_s``, or the default of where it runs (``ResolvedRecipe.runs_on_gpus``)."""
    recipe = resolved.recipe
    if recipe.run.stall_timeout_s is not None:
        return recipe.run.stall_timeout_s
    return GPU_DEFAULT_S if resolved.runs_on_gpus else CPU_DEFAULT_S


_beats = 0  # this process's beats: what its own ProcessWatch compares
_sink: Callable[[], None] | None = None  # where a launcher that does not read the files wants the beats


def beat() -> None:
    """This rank made progress."""
    global _beats
    _beats += 1
    if _sink is not None:
        _sink()
        return
    directory = os.environ.get(ENV)
    if directory:
        path = Path(directory) / f"rank-{int(os.environ.get('RANK', 0)):05d}"
        path.write_text(str(os.getpid()))  # rewriting moves its mtime: the beat


def report_beats_to(sink: Callable[[], None] | None) -> None:
    """Send this process's beats to ``sink`` instead of the heartbeat file (the Ray launcher's ranks: their
    launcher runs on another host); None: back to the file."""
    global _sink
    _sink = sink


def stall_verdict(world_size: int, timeout_s: float, beats: dict[int, tuple[float, int]],
                  state_of: Callable[[int, int], str]) -> str | None:
    """The line that ends a stalled run, or None while some rank made progress within ``timeout_s``.

    ``beats``: rank → (seconds since its last beat, pid) for the ranks that have beaten; ``state_of(rank, pid)``:
    the process's state letter (``/proc/PID/stat``) where the rank runs."""
    if not beats or min(age for age, _ in beats.values()) < timeout_s:
        return None
    return f"no rank made progress for {timeout_s:g} s (run.stall_timeout_s); stuck: {_blame(world_size, beats, state_of)}"


def _blame(world_size: int, beats: dict[int, tuple[float, int]], state_of: Callable[[int, int], str]) -> str:
    for rank, (_, pid) in sorted(beats.items()):
        state = state_of(rank, pid)
        if state in STATES:
            return f"rank {rank} ({STATES[state]})"
    silent = sorted(set(range(world_size)) - set(beats))
    if silent:
        return f"rank {silent[0]} (it never reached its first episode)"
    rank = max(beats, key=lambda r: beats[r][0])
    return f"rank {rank} (its last progress is the oldest)"


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` on this host ("?" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class _WatchThread:
    """A daemon thread running ``self._watch`` while the ``with`` block runs; ``self._stop`` tells it to end."""

    def _start_watching(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()

    def _stop_watching(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        raise NotImplementedError


class StallWatch(_WatchThread):
    """In the launcher's process while ranks run: ``with StallWatch(world, timeout_s) as watch`` sets the
    ranks' heartbeat directory; ``watch.verdict`` is the line naming the stuck rank once it stopped them."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.verdict: str | None = None

    def __enter__(self) -> StallWatch:
        self._dir = tempfile.TemporaryDirectory(prefix="grpo-heartbeat-")
        self._previous = {key: os.environ.get(key) for key in (ENV, "PYTHONWARNINGS")}
        os.environ[ENV] = self._dir.name  # the ranks are spawned with this environment
        # multiprocessing's resource tracker (started with the first rank) warns at exit about the semaphores of
        # ranks this watch killed: noise after the one line that says what happened
        os.environ["PYTHONWARNINGS"] = ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning"]))
        self._start_watching()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_watching()
        for key, value in self._previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._dir.cleanup()

    def _beats(self) -> dict[int, tuple[float, int]]:
        """rank → (seconds since its last beat, pid) for the ranks that have beaten."""
        now, beats = time.time(), {}
        for path in Path(self._dir.name).glob("rank-*"):
            try:
                beats[int(path.name[5:])] = (now - path.stat().st_mtime, int(path.read_text() or 0))
            except (OSError, ValueError):
                continue
        return beats

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            verdict = stall_verdict(self.world_size, self.timeout_s, self._beats(), lambda _, pid: process_state(pid))
            if verdict is None:
                continue
            self.verdict = verdict
            for proc in multiprocessing.active_children():
                proc.kill()  # SIGKILL ends a stopped process too
            return


def watching(world_size: int, timeout_s: float) -> AbstractContextManager:
    """Around a run: a one-process run watches itself (``ProcessWatch``); the launcher's ``StallWatch`` watches
    the ranks of a multi-process run it spawned."""
    return ProcessWatch(timeout_s) if world_size == 1 else nullcontext()


def _end_run(line: str) -> None:
    from trainer.console_log import say_now

    say_now(f"\nerror: {line}\n")  # the main thread is stuck: nothing else would print it
    os._exit(1)


class ProcessWatch(_WatchThread):
    """``with ProcessWatch(timeout_s)``: once this process, having beaten at least once, goes ``timeout_s`` of
    its running time without another beat, ``on_stall`` gets one line naming where the main thread is (by
    default: printed, and the process exits 1). What it can and cannot see: the module docstring."""

    def __init__(self, timeout_s: float, on_stall: Callable[[str], None] = _end_run, poll_s: float = POLL_S):
        self.timeout_s, self.on_stall, self.poll_s = timeout_s, on_stall, poll_s

    def __enter__(self) -> ProcessWatch:
        self._start_watching()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_watching()

    def _watch(self) -> None:
        started = seen = _beats  # a process may run more than one run (tests): count this run's beats
        stalled, last = 0.0, time.monotonic()
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            elapsed, last = now - last, now
            if _beats != seen or _beats == started:  # progress, or still starting (as the launcher's: not watched)
                seen, stalled = _beats, 0.0
                continue
            # a much longer wait than asked: the process was stopped (or the machine slept) — not the run's time
            stalled += min(elapsed, 2 * self.poll_s)
            if stalled >= self.timeout_s:
                self.on_stall(f"no progress for {self.timeout_s:g} s (run.stall_timeout_s); stuck: the run's one "
                              f"process, its main thread at {_main_thread_at()}")
                return


def _main_thread_at() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
