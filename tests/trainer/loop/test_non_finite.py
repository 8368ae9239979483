"""A diverging run stops with a clear message and keeps its last good (finite) checkpoint."""

import json
import subprocess
import sys

import pytest
import torch


# lr 1e6 used to stop at episode 2 only through the k3 overflow of issue 12.1 (weights of ~1e6 are finite);
# 1e20 makes the weights themselves overflow one episode later.
@pytest.mark.parametrize(("lr", "stop"), [("1e20", 3), ("1e30", 2)])
def test_divergence_stops_run_and_keeps_last_good_checkpoint(repo, tmp_path, lr, stop):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", f"grpo.lr={lr}", "run.episodes=5",
                          "run.checkpoint_every=1", "--run-dir", str(run_dir)],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: episode {stop}: ") and f"last good checkpoint: episode {stop - 1}" in message
    assert "Traceback" not in out.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == f"episode-{stop - 1:06d}"
    state = torch.load(run_dir / "checkpoints" / f"episode-{stop - 1:06d}" / "rank-00000.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["policy"]["model"].values() if torch.is_tensor(t))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith(f"stopped: episode {stop}")
