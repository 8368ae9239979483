"""Tests of the real vLLM 0.8.5 engine (its CPU build): they run in `nox -s tests_vllm`'s environment.

Elsewhere (the main test env has no vLLM) this folder is not collected; `nox -s tests_vllm` sets
GRPO_REQUIRE_VLLM=1 so that a vLLM that does not import there fails the session instead of skipping it.
"""

import importlib.util
import os
import time

import psutil
import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("GRPO_REQUIRE_VLLM"):
    raise pytest.UsageError("GRPO_REQUIRE_VLLM=1 but vllm is not installed in this environment")
collect_ignore_glob = [] if HAVE_VLLM else ["test_*.py"]


@pytest.fixture(scope="session")
def matrix():
    from matrix import load_matrix

    return load_matrix()


@pytest.fixture(scope="session")
def engine_processes():
    """Live processes whose environment has GRPO_TEST_MARK=mark: the engine processes a test started."""

    def find(mark: str, wait: float = 5.0) -> list[psutil.Process]:
        """Those still alive after ``wait`` seconds (helpers such as torch's compile workers exit about 1 s after
        their parent)."""
        deadline = time.monotonic() + wait
        while True:
            found = []
            for proc in psutil.process_iter():
                try:
                    if proc.environ().get("GRPO_TEST_MARK") == mark and proc.pid != os.getpid():
                        found.append(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    return find
