"""Faults planted in the smoke's runs (``GRPO_STACK_PLANT_FAULT``, read as each run starts) for test_smoke.py.

The smoke runs a family's cells in one process of its own (named ``smoke-<family>``), so a count kept in that
process's environment tells its runs apart: the fp32 run is the first, the bf16 run the second.
"""

import multiprocessing
import os
import signal
import time


def _run_number() -> int:
    number = int(os.environ.get("SMOKE_FAULT_RUN", "0")) + 1
    os.environ["SMOKE_FAULT_RUN"] = str(number)
    return number


def raise_hang_or_die() -> None:
    """dense: the fp32 run raises, the bf16 run hangs. Any other family: the fp32 run is left alone, the bf16 run
    SIGKILLs its process."""
    number = _run_number()
    if multiprocessing.current_process().name == "smoke-dense":
        if number == 1:
            raise RuntimeError("planted: the fp32 run raises")
        time.sleep(3600)
    elif number == 2:
        os.kill(os.getpid(), signal.SIGKILL)
