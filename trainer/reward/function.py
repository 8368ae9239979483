"""Your own reward: ``grpo.reward: "pkg.module:fn"`` names ``fn(response_text, ground_truth, extra) -> float``.

``extra`` is a dict with the row's ``data_source`` and, for verl-layout parquet, its ``extra_info``. The
function is imported in the trainer with the working directory on ``sys.path`` (as ``python -m`` has it), then
every call runs in a worker process of its own (``sandbox.py``, the math-verify grader's mechanism): killed after
``TIMEOUT_S``, its address space capped at ``MEMORY_LIMIT_BYTES`` beyond the fork. A call that raises, times
out, kills its worker or returns anything but a finite number scores 0.0 and counts as failed
(``reward/failed`` in the metrics): a reward bug costs samples, never the run.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable
from numbers import Real

from trainer.reward.sandbox import Sandbox

logger = logging.getLogger(__name__)

TIMEOUT_S = 5.0  # per response; rule rewards take milliseconds, a model-free check that needs seconds is rare
MEMORY_LIMIT_BYTES = 2 * 2**30  # beyond what the worker had when forked
WARNINGS = 5  # failures logged with their reason; all are counted


class RewardFunctionError(ValueError):
    """``grpo.reward`` names nothing callable with three arguments; the message is one line with the fix."""


def load(ref: str) -> Callable[[str, str, dict], float]:
    """The function ``ref`` ("pkg.module:fn") names; RewardFunctionError if it cannot be imported or called so."""
    module_name, _, name = ref.partition(":")
    where = f"grpo.reward {ref!r}"
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RewardFunctionError(
            f"{where}: no module named {exc.name!r}; put {module_name} in the directory you "
            f"start from or on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module failed while importing
        raise RewardFunctionError(
            f"{where}: importing {module_name} raised {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}"
        ) from None
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardFunctionError(
            f"{where}: module {module_name} has no {name!r}; its functions: {', '.join(public) or 'none'}"
        )
    if not callable(fn):
        raise RewardFunctionError(f"{where}: {name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("response", "ground truth", {})
    except TypeError:
        raise RewardFunctionError(
            f"{where}: {name}{inspect.signature(fn)} cannot take (response_text, ground_truth, extra)"
        ) from None
    except ValueError:  # a builtin without a signature: let the first call tell
        pass
    return fn


class RewardFunction:
    """The function ``ref`` names, loaded now; :meth:`score` runs it in the bounded worker."""

    def __init__(self, ref: str, timeout_s: float = TIMEOUT_S, memory_limit_bytes: int = MEMORY_LIMIT_BYTES):
        self.ref, self.fn, self.timeout_s = ref, load(ref), timeout_s
        self._sandbox = Sandbox(memory_limit_bytes=memory_limit_bytes)  # forked at the first call
        self._warned = 0

    def score(self, response: str, ground_truth: str | None, extra: dict) -> tuple[float, bool]:
        """(reward, True), or (0.0, False) when the function raised, timed out, died or returned no finite number."""
        try:
            value = self._sandbox.call(self.fn, response, ground_truth, extra, timeout_s=self.timeout_s)
        except Exception as exc:  # DeadlineExceeded, WorkerFailed (its exception, or the worker died)
            return self._failed(f"{type(exc).__name__}: {exc}")
        if not isinstance(value, Real) or not math.isfinite(value):
            return self._failed(f"returned {value!r:.80}, not a finite number")
        return float(value), True

    def _failed(self, reason: str) -> tuple[float, bool]:
        if self._warned < WARNINGS:  # every failure is counted in the metrics; the first few are shown
            self._warned += 1
            logger.warning("reward %s: %s; scored 0", self.ref, reason[:300])
        return 0.0, False
