"""Run a grading function in a child process with a hard deadline: the call returns in bounded time, always.

Symbolic graders (sympy, math-verify) can spend seconds to minutes inside one C-level big-integer operation
(``2^{1000\\cdot1000\\cdot1000}``, ``\\Gamma(10^6)``, ``\\binom{10^6}{500000}``). ``signal.alarm`` cannot
interrupt that, and works only in the main thread; a thread cannot be killed at all. A process can: the
parent waits ``timeout_s`` for the answer, then kills the worker with SIGKILL and counts the call as failed.

Workers are forked from the calling process, so they start with whatever it has imported and warmed up
(math-verify's parser takes a second to initialise): a replacement after a kill costs one fork, milliseconds.
Forking a process that has threads (torch's pools) is safe here for the same reason it is for torch's
DataLoader workers: the child runs pure Python and touches none of the parent's threads' state. (A fork
server or spawn would re-import the grader, seconds per replacement, and a fork server is shared with
whatever else in the process started it first.) The worker also caps its own CPU time per call with ``RLIMIT_CPU``, so one that loses its parent (a
SIGKILLed trainer) still dies after at most one deadline. With ``memory_limit_bytes`` it also caps its address
space (``RLIMIT_AS``) at what it had when forked plus that many bytes: an allocation beyond raises MemoryError in
the function (an error reply) or kills the worker (a replacement is forked). One worker serves the whole process,
one call at a time; calls from several threads queue on a lock.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection


class DeadlineExceeded(TimeoutError):
    """The function did not return within the deadline; its worker was killed."""


class WorkerFailed(RuntimeError):
    """The function raised in the worker, or the worker died; the message carries the reason."""


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as statm:  # first field: total program size, in pages
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _serve(conn: Connection, parent_end: Connection, memory_limit_bytes: int | None = None) -> None:
    """Worker loop: receive (fn, args, cpu_limit_s), send back ("ok", value) or ("error", reason)."""
    parent_end.close()  # inherited by the fork; closed so the parent's exit reaches `recv` as EOF
    if memory_limit_bytes is not None:
        # relative to the fork's own size: a worker forked from a trainer already maps gigabytes (torch, CUDA)
        limit = _address_space_bytes() + memory_limit_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    while True:
        try:
            fn, args, cpu_limit_s = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe or exited: nothing left to serve
            return
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = math.ceil(used.ru_utime + used.ru_stime)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (spent + cpu_limit_s, hard))  # SIGXCPU kills it beyond
        try:
            reply = ("ok", fn(*args))
        except Exception as exc:  # reported to the parent; the worker stays up
            reply = ("error", f"{type(exc).__name__}: {exc}"[:500])
        conn.send(reply)


class Sandbox:
    """One worker process that runs picklable module-level functions under a deadline (and a memory cap)."""

    def __init__(self, memory_limit_bytes: int | None = None) -> None:
        self._memory_limit_bytes = memory_limit_bytes
        self._ctx = multiprocessing.get_context("fork")
        self._lock = threading.Lock()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        if self._proc is None or not self._proc.is_alive():
            parent, child = self._ctx.Pipe()
            self._proc = self._ctx.Process(target=_serve, args=(child, parent, self._memory_limit_bytes), daemon=True,
                                           name="grader-sandbox")
            self._proc.start()
            child.close()
            self._conn = parent
        return self._conn

    def warm_up(self) -> None:
        """Start the worker now rather than inside the first call."""
        with self._lock:
            self._start()

    def stop(self) -> None:
        """Kill the worker, if any; the next call starts a new one."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._proc is not None:
            self._proc.join()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def call(self, fn: Callable, *args, timeout_s: float) -> object:
        """``fn(*args)`` in the worker; raises DeadlineExceeded after ``timeout_s`` s, WorkerFailed on errors."""
        with self._lock:
            conn = self._start()
            try:
                conn.send((fn, args, math.ceil(timeout_s) + 1))
                ready = conn.poll(timeout_s)
                status, value = conn.recv() if ready else ("deadline", None)
            except (EOFError, OSError) as exc:  # the worker died (e.g. SIGXCPU, out of memory)
                self.stop()
                raise WorkerFailed(f"grading worker died: {type(exc).__name__}") from None
            if status == "deadline":
                self.stop()
                raise DeadlineExceeded(f"{getattr(fn, '__name__', fn)} took longer than {timeout_s} s")
            if status == "error":
                raise WorkerFailed(value)
            return value
