"""A real 2-episode single-layout suite, run once per test session through `python -m bench run`."""

import subprocess
import sys

import pytest

SMOKE = """
  smoke:
    recipes: [tiny-qwen2.5]
    layouts: [single]
    episodes: 2
    warmup_episodes: 1
    overrides: {grpo.prompts_per_episode: 4}
"""


@pytest.fixture(scope="session")
def bench_matrix(tmp_path_factory):
    """The committed matrix plus the small `smoke` suite (the last section of the file is `benchmarks:`)."""
    from tests.conftest import REPO

    path = tmp_path_factory.mktemp("matrix") / "matrix.yaml"
    path.write_text((REPO / "matrix.yaml").read_text() + SMOKE)
    return path


@pytest.fixture(scope="session")
def smoke_result(bench_matrix, tmp_path_factory):
    from tests.conftest import REPO

    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "smoke", "--matrix", str(bench_matrix),
         "--results", str(out / "results"), "--runs", str(out / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (out / "results").glob("smoke-*.json")
    return path
