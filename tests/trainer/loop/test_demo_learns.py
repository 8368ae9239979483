"""The embedded demo (`nox -s train`) learns: mean reward of the last 10% of episodes beats the first 10%."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_reward_rises_by_at_least_0_3(repo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "--run-dir", str(tmp_path / "demo")], cwd=repo,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["episodes"] == 150 and summary["status"] == "finished"
    assert summary["reward/last_10pct_mean"] - summary["reward/first_10pct_mean"] >= 0.3, summary
    assert "reward: first episode" in out.stdout and f"run directory: {tmp_path / 'demo'}" in out.stdout
