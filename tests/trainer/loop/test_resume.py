"""kill -9 in the middle of a run, resume, and the next episodes equal those of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["tiny-qwen2.5", "run.episodes=6", "run.checkpoint_every=2", "run.seed=7"]


def _rows(run_dir):
    return {r["episode"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _deterministic(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "memory/", "clock/"))}


def _trainer(repo, *args, **kw):
    return [sys.executable, "-m", "trainer", *args], {"cwd": repo, **kw}


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(repo, tmp_path):
    straight = tmp_path / "straight"
    cmd, kw = _trainer(repo, *ARGS, "--run-dir", str(straight))
    subprocess.run(cmd, **kw, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    cmd, kw = _trainer(repo, *ARGS, "--run-dir", str(killed))
    proc = subprocess.Popen(cmd, **kw, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once episode 3 is logged: past the episode-2 checkpoint
        if (killed / "metrics.jsonl").exists() and 3 in _rows(killed):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before_kill = _rows(killed)
    saved = int((killed / "checkpoints" / "latest").read_text().removeprefix("episode-"))
    assert max(before_kill) > saved and max(before_kill) < 6, "the kill must land between checkpoints"

    cmd, kw = _trainer(repo, "--resume", str(killed), *ARGS)
    subprocess.run(cmd, **kw, check=True, capture_output=True, timeout=600)
    resumed, reference = _rows(killed), _rows(straight)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for episode in range(saved + 1, 7):
        assert _deterministic(resumed[episode]) == _deterministic(reference[episode])
