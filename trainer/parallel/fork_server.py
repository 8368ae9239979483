"""The fork server the local launcher's ranks start from: multiprocessing's, started for one launch with what ranks
import already imported, so that each rank is a fork of it instead of a fresh interpreter that spends seconds of
CPU on the same imports (megatron-core alone ~5 s).

One server per launch (``start`` before the ranks, ``stop`` after them): it is started with the driver's
environment, working directory, import path and standard streams of the moment, as a spawned rank would be, and
holds nothing open once the launch is over (a console log's pipe, a later launch's changed environment).

Three things multiprocessing's server does not do, done here:
- it ignores SIGTERM: a scheduler's SIGTERM to the whole process group would otherwise kill it and, by each rank's
  PR_SET_PDEATHSIG, every rank before the rank's own handler checkpoints (``in_rank`` restores the default);
- it takes the driver's import path (multiprocessing passes it but never applies it: the server imported from its
  working directory first);
- a rank closes its copy of the server's "alive" pipe (``in_rank``), so the server ends with the driver and the
  ranks with the server, whichever of them is killed.

This module is the server's first import; it acts only where ``SERVER_ENV`` is set, which is only in the server's
own environment, and removed there before any rank is forked.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from multiprocessing import forkserver, set_forkserver_preload, util

SERVER_ENV = "GRPO_STACK_FORK_SERVER_PATH"


def start(imports: list[str]) -> None:
    """The server running, with ``imports`` imported (after this module)."""
    stop()
    set_forkserver_preload([__name__, *imports])
    os.environ[SERVER_ENV] = json.dumps(sys.path)
    try:
        forkserver.ensure_running()
    finally:
        del os.environ[SERVER_ENV]


def stop() -> None:
    """The server gone, and its ranks with it. Killed rather than asked by closing its pipe, which waits for every
    holder of a copy (a process this one forked) to close it too."""
    server = forkserver._forkserver
    with server._lock:
        if server._forkserver_pid is None:
            return
        os.close(server._forkserver_alive_fd)
        os.kill(server._forkserver_pid, signal.SIGKILL)
        os.waitpid(server._forkserver_pid, 0)
        if not util.is_abstract_socket_namespace(server._forkserver_address):
            os.unlink(server._forkserver_address)
        server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None


def in_rank() -> None:
    """First thing in a rank forked from the server: its copy of the alive pipe closed, SIGTERM's default back."""
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _set_up_server() -> None:
    path = os.environ.pop(SERVER_ENV, None)
    if path is None:
        return
    sys.path[:] = json.loads(path)
    # Not SIGINT: multiprocessing ignores it once the imports are done, and the ranks get the handler it finds
    # then, which must stay Python's (a rank ignoring ^C would not checkpoint on it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_set_up_server()
