"""A diverging run stops with a clear message and keeps its last good (finite) checkpoint."""

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("lr", ["1e6", "1e30"])
def test_divergence_stops_run_and_keeps_last_good_checkpoint(repo, tmp_path, lr):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", f"grpo.lr={lr}", "run.episodes=5",
                          "run.checkpoint_every=1", "--run-dir", str(run_dir)],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("error: episode 2: ") and "last good checkpoint: episode 1" in message
    assert "Traceback" not in out.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "episode-000001"
    state = torch.load(run_dir / "checkpoints" / "episode-000001" / "rank-00000.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["policy"]["model"].values() if torch.is_tensor(t))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("stopped: episode 2")
