"""RUN/train.log: the run's console output (this process's and every rank's), without progress-bar noise.

stdout and stderr are redirected at the file-descriptor level, so ranks started by the launcher (which inherit
them) are captured too; each stream still reaches the terminal unchanged. A line redrawn with carriage returns
(a tqdm bar) is logged once, as it last stood.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing import resource_tracker
from pathlib import Path

# While console_log runs: the real stderr and train.log's fd, for a message that cannot wait for the pumps.
_terminal_stderr: int | None = None
_log_fd: int | None = None


def say_now(text: str) -> None:
    """Write ``text`` to the terminal's stderr and to train.log at once (a process about to ``os._exit`` cannot
    wait for the pump)."""
    os.write(_terminal_stderr if _terminal_stderr is not None else 2, text.encode())
    if _log_fd is not None:
        with suppress(OSError):  # a full disk: the terminal has it
            os.write(_log_fd, text.lstrip("\n").encode())  # O_APPEND: one write lands whole, between the pumps' lines


def _pump(source: int, terminal: int, log, lock: threading.Lock) -> None:
    pending, logging = b"", True
    while chunk := os.read(source, 65536):
        os.write(terminal, chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines and logging:
            logging = _append(log, lock, b"".join(line.rsplit(b"\r", 1)[-1] + b"\n" for line in lines))
    if logging and pending.rsplit(b"\r", 1)[-1].strip():
        _append(log, lock, pending.rsplit(b"\r", 1)[-1] + b"\n")
    os.close(source)


def _append(log, lock: threading.Lock, data: bytes) -> bool:
    """Append to train.log; False once that fails (a full disk): the terminal still gets everything."""
    try:
        with lock:
            log.write(data)
            log.flush()
        return True
    except OSError:
        return False


def _start_resource_tracker(stderr: int) -> None:
    """multiprocessing's resource tracker, started by the first spawned process (the launcher's ranks, an engine's
    process), lives until this process exits: started inside the block, it would hold the pipes open and the
    pumps' join would wait its full timeout. Started now, with ``stderr`` as its stderr: its warnings (semaphores
    of a killed rank) still reach train.log, not the terminal's last line."""
    saved = os.dup(2)
    os.dup2(stderr, 2)
    try:
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def console_log(path: Path) -> Iterator[None]:
    """Copy fds 1 and 2 (and so the ranks') into ``path`` for the block."""
    global _terminal_stderr, _log_fd
    sys.stdout.flush()
    sys.stderr.flush()
    lock, log = threading.Lock(), path.open("ab")
    _start_resource_tracker(log.fileno())
    saved, threads = {}, []
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        saved[fd] = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        threads.append(threading.Thread(target=_pump, args=(read_end, saved[fd], log, lock), daemon=True))
        threads[-1].start()
    _terminal_stderr, _log_fd = saved[2], log.fileno()
    try:
        yield
    finally:
        _terminal_stderr = _log_fd = None
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)  # the pipe's last write end closes: its pump reads to the end and stops
        for thread in threads:
            thread.join(timeout=10)
        for original in saved.values():
            os.close(original)
        with suppress(OSError):
            log.close()
