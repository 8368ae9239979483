"""The grading sandbox: a call past its deadline is killed and the next call gets a fresh worker."""

import os
import subprocess
import sys
import time

import pytest

from trainer.reward.sandbox import DeadlineExceeded, Sandbox, WorkerFailed


@pytest.fixture
def sandbox():
    box = Sandbox()
    yield box
    box.stop()


def test_deadline_kills_the_worker_and_a_new_one_serves_the_next_call(sandbox):
    assert sandbox.call(pow, 2, 10, timeout_s=30) == 1024
    first = sandbox._proc
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="sleep took longer than 0.5 s"):
        sandbox.call(time.sleep, 60, timeout_s=0.5)
    assert time.perf_counter() - start < 30  # returned at the deadline, not after the 60 s sleep
    assert not first.is_alive() and first.exitcode is not None
    assert sandbox.call(pow, 3, 3, timeout_s=30) == 27 and sandbox._proc is not first


def test_an_error_in_the_function_is_reported_and_the_worker_stays(sandbox):
    assert sandbox.call(pow, 2, 2, timeout_s=30) == 4
    worker = sandbox._proc
    with pytest.raises(WorkerFailed, match="ValueError: invalid literal"):
        sandbox.call(int, "x", timeout_s=30)
    assert sandbox.call(pow, 2, 3, timeout_s=30) == 8 and sandbox._proc is worker


def test_stop_leaves_no_worker(sandbox):
    sandbox.call(pow, 2, 2, timeout_s=30)
    worker = sandbox._proc
    sandbox.stop()
    assert not worker.is_alive()


ORPHAN = """
import sys, time
from trainer.reward.sandbox import Sandbox
if __name__ == "__main__":
    box = Sandbox()
    box.call(pow, 2, 2, timeout_s=30)
    print(box._proc.pid, flush=True)
    if sys.argv[1] == "busy":
        box.call(sum, range(10**12), timeout_s=2)  # a pure C loop of hours
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its (dead) parent's reaper counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow  # a subprocess that imports the trainer, twice
@pytest.mark.parametrize("state", ["idle", "busy"])
def test_worker_does_not_outlive_a_killed_parent(repo, tmp_path, state):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script), state], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)
    finally:
        parent.kill()
        parent.wait()
    # idle: EOF at once; busy: its own CPU-time limit (deadline + 1 CPU s), which on a loaded machine is
    # several wall seconds
    deadline = time.monotonic() + 60
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)
