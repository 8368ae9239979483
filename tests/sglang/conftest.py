"""Tests of the SGLang 0.5.2 adapter against the 0.5.2 wheel's real classes: they run in `nox -s tests_sglang`'s
environment (SGLang has no CPU engine; its ServerArgs, io_struct, SamplingParams, MultiprocessingSerializer and
FlattenedTensorBucket import and run on CPU).

Elsewhere (the main test env has no SGLang) this folder is not collected; `nox -s tests_sglang` sets
GRPO_REQUIRE_SGLANG=1 so that an SGLang that does not import there fails the session instead of skipping it.
"""

import importlib.util
import os

import pytest

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
if not HAVE_SGLANG and os.environ.get("GRPO_REQUIRE_SGLANG"):
    raise pytest.UsageError("GRPO_REQUIRE_SGLANG=1 but sglang is not installed in this environment")
collect_ignore_glob = [] if HAVE_SGLANG else ["test_*.py"]


@pytest.fixture(scope="session")
def matrix():
    from matrix import load_matrix

    return load_matrix()
