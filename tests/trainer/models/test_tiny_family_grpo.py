"""Each MoE family's tiny recipe runs GRPO end to end on CPU (single process), and the torch engine agrees with
the trainer after weight sync (transformers' own model against megatron-core's)."""

import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny-moonlight", "tiny-qwen3-next"])
def test_tiny_recipe_runs_grpo_episodes(repo, tmp_path, recipe):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", recipe, "run.episodes=2", "grpo.prompts_per_episode=4",
           "grpo.samples_per_prompt=4", "--run-dir", str(run)]
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert rows[0]["tokens/response"] > 0 and (run / "checkpoints" / "latest").exists()
    assert all(r["mismatch/logprob_abs_diff_max"] < 1e-4 for r in rows)
