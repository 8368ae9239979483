"""Run directories: unique even within one second, a directory holding a run is never appended to, and the ranks
of a run all see the one the driver writes."""

import hashlib
import json
import subprocess
import sys

import pytest

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


def _check_from(views: dict, layout):
    """One rank of two: ``check_shared`` on the run directory as this rank's host shows it (``views[rank]``)."""
    from matrix.layout import ParallelLayout
    from trainer.config import TrainerInputError
    from trainer.parallel.job import Job
    from trainer.parallel.rank import rank_session
    from trainer.run_dir import check_shared

    with rank_session(layout) as me:
        job = Job(ParallelLayout.of(layout, me.world), me.rank)
        try:
            check_shared(views[me.rank], job)
        except TrainerInputError as exc:
            return str(exc)
        return "shared"


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_ranks_that_do_not_see_the_drivers_run_directory_stop_the_run_naming_one(tmp_path, shared):
    """On two hosts without a shared filesystem, rank 1 looks at the same path on its own disk (here another
    directory): every rank would write its checkpoint part where the driver never reads it. The run stops at
    start, naming the rank and its host; where the directory is shared, nothing is left behind."""
    from matrix.schema import Layout
    from trainer.parallel.launcher import launch

    drivers, elsewhere = tmp_path / "run", tmp_path / "other-host"
    drivers.mkdir(), elsewhere.mkdir()
    said = launch(_check_from, 2, {0: drivers, 1: drivers if shared else elsewhere}, Layout(dp=2))
    if shared:
        assert said == "shared"
    else:
        assert said.startswith(f"the run directory {drivers} that rank 0 writes (on ") and " is not there for rank 1 on " in said
        assert said.endswith("put --run-dir on a filesystem every node mounts at the same path")
    assert list(drivers.iterdir()) == [] and list(elsewhere.iterdir()) == []
