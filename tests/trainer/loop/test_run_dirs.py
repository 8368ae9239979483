"""Run directories: unique even within one second, and a directory holding a run is never appended to."""

import hashlib
import json
import subprocess
import sys

from trainer.cli import _new_run_dir


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path):
    first, second = _new_run_dir(tmp_path, "demo"), _new_run_dir(tmp_path, "demo")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name.startswith(first.name)


def test_run_dir_that_holds_a_run_is_refused_without_resume(repo, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"episode": 1}\n')
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", "--run-dir", str(tmp_path)], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert f"--run-dir {tmp_path} already holds files" in line and f"--resume {tmp_path}" in line
    assert (tmp_path / "metrics.jsonl").read_text() == '{"episode": 1}\n'  # untouched


def test_resume_with_another_layout_is_refused(repo, tmp_path):
    from matrix.layout import ParallelLayout
    from trainer.checkpoint import save
    from trainer.config import resolve
    from trainer.parallel.job import Job

    (tmp_path / "config.json").write_text(json.dumps({"recipe": "tiny-qwen2.5", "overrides": [], "rehearse": False,
                                                      "resolved": resolve("tiny-qwen2.5", {}).model_dump(mode="json")}))
    save(tmp_path, 2, {}, Job(ParallelLayout(world_size=1)))
    (tmp_path / "checkpoints" / "episode-000002" / "rank-00001.pt").write_bytes(b"")  # as if written by 2 ranks
    manifest = tmp_path / "checkpoints" / "episode-000002" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["rank-00001.pt"] = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    manifest.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, "-m", "trainer", "--resume", str(tmp_path), "tiny-qwen2.5"], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "its checkpoint holds 2 rank(s), this layout runs 1" in line
