"""The variant fields reach the real loop: a run with non-default variants trains and logs what they compute."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # two tiny episodes, ~45 s on 2 cores
def test_run_with_non_default_variants(repo, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["grpo.policy_loss=dual_clip", "grpo.kl_estimator=k2", "grpo.kl_coef=0.05",
                 "grpo.advantage=grpo_unbiased", "grpo.grader=math-verify"]
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", "run.episodes=2", *overrides,
                          "--run-dir", str(run_dir)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grpo = json.loads((run_dir / "config.json").read_text())["resolved"]["recipe"]["grpo"]
    assert (grpo["policy_loss"], grpo["kl_estimator"], grpo["advantage"]) == ("dual_clip", "k2", "grpo_unbiased")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("actor/pg_clipfrac_lower" in row for row in rows)  # only the dual-clip loss reports it
    last = rows[-1]  # after one step the policy has moved off the reference: KL > 0, and it is in the loss
    assert last["loss/kl"] > 0
    assert last["loss/total"] == pytest.approx(last["loss/pg"] + 0.05 * last["loss/kl"], rel=1e-4, abs=1e-12)
