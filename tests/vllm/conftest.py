"""Tests of the real vLLM 0.8.5 engine (its CPU build): they run in `nox -s tests_vllm`'s environment (collected
only where vLLM imports: tests/conftest.py)."""

import os
import time

import psutil
import pytest


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
