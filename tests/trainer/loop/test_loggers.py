"""`--tensorboard` writes the same per-episode scalars as metrics.jsonl."""

import json
import subprocess
import sys

import pytest


def test_tensorboard_scalars_match_metrics_jsonl(repo, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", "run.episodes=2", "--tensorboard",
                    "--run-dir", str(run_dir)], cwd=repo, check=True, capture_output=True, timeout=300)
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward/mean", "grad_norm", "loss/entropy"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["episode"] for r in rows] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)
