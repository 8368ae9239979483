"""One version truth: the harness runs on each GPU image's locked versions (CPU torch standing in for CUDA torch).

For each GPU image, an environment holding the lock's versions of everything the harness imports: every
top-level module of those packages imports, and the trainer's model/parquet/weight-sync tests pass in it. The
same checks fail on the lock as it was before (pyarrow 26 beside numpy 1.26; megatron-core 0.14's
`model_comm_pgs=`), planted back into today's lock. Slow: CI runs it (needs PyPI or a mirror for the wheels).
"""

from __future__ import annotations

import pytest

from images import lockenv, lockfile
from images.common import LOCKS_DIR

from .conftest import DATA

pytestmark = pytest.mark.slow

GPU_IMAGES = ("vllm-te27", "sglang-te27")


@pytest.mark.parametrize("image", GPU_IMAGES)
def test_harness_runs_on_the_locked_versions(image):
    lock = (LOCKS_DIR / f"{image}.lock.txt").read_text()
    assert lockenv.missing_requirements(lock) == []
    python = lockenv.build_env(image, lock)
    assert lockenv.import_problems(python, lock) == []
    done = lockenv.run_trainer_tests(python)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def _planted_lock() -> str:
    """Today's vllm-te27 lock with the old pyarrow and megatron-core pins put back."""
    text = (LOCKS_DIR / "vllm-te27.lock.txt").read_text()
    old = lockfile.parse((DATA / "old-vllm-te27-blocks.txt").read_text())
    now = lockfile.parse(text)
    for name, pin in old.items():
        assert now[name].version != pin.version
        text = text.replace(now[name].block, pin.block)
    return text


def test_the_old_lock_fails_both_checks(tmp_path):
    lock = _planted_lock()
    python = lockenv.build_env("vllm-te27-old", lock, tmp_path / "env")
    problems = lockenv.import_problems(python, lock)
    assert [p.split(":")[0] for p in problems] == ["pyarrow (pyarrow==26.0.1)"], problems
    assert "NumPy 2.0 or newer" in problems[0]
    # The megatron-core API break, alone: the model tests import no pyarrow.
    done = lockenv.run_trainer_tests(python, lockenv.TRAINER_TESTS[1:2], "test_train_step_lowers_loss")
    assert done.returncode != 0
    assert "model_comm_pgs" in done.stdout
