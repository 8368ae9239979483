"""The grading sandbox: a call past its deadline is killed and the next call gets a fresh worker."""

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
