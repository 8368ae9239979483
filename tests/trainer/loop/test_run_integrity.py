"""MUST SHOW (issue 21): a run directory that nothing corrupts and a resume that trusts the run.

One trainer per directory (RUN/.lock); no metrics row lost to a kill between a checkpoint and its row; a resume
takes its recipe and overrides from RUN/config.json; damaged checkpoints and a torn metrics line are skipped with a
reason; a run killed before its first checkpoint starts again in place. Each ends in the rows and weights of an
uninterrupted run (`same_run`).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import local_ranks
from trainer.cli import main

KILL_POINTS = Path(__file__).with_name("kill_points.py")
REPO = Path(__file__).resolve().parents[3]
ARGS = ["tiny-qwen2.5", "run.episodes=4", "run.checkpoint_every=2", "run.seed=7", "grpo.lr=2e-3"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def deterministic(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "memory/", "clock/"))}


def weights(run_dir, episode):
    state = torch.load(run_dir / "checkpoints" / f"episode-{episode:06d}" / "rank-00000.pt", weights_only=False)
    return state["policy"]["model"]


def same_run(run_dir, straight, episodes=4):
    """The rows (but timings) and the final weights of the uninterrupted run, bit for bit."""
    got, want = rows(run_dir), rows(straight)
    assert [r["episode"] for r in got] == list(range(1, episodes + 1))
    assert [deterministic(r) for r in got] == [deterministic(r) for r in want[:episodes]]
    ours, theirs = weights(run_dir, episodes), weights(straight, episodes)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def trainer(repo, *args, fault=None, timeout=300):
    env = {**os.environ, "GRPO_STACK_PLANT_FAULT": f"{KILL_POINTS}:{fault}"} if fault else None
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_error_line(out, code=2):
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    return line


def last_line(out, code):
    """The line a run ends with (the progress bar is on stderr too); no traceback anywhere."""
    assert out.returncode == code and "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    return out.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = trainer(REPO, *ARGS, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture
def finished(straight, tmp_path):
    """A copy of the uninterrupted run (checkpoints of episodes 2 and 4)."""
    return Path(shutil.copytree(straight, tmp_path / "run"))


@pytest.mark.slow
def test_a_second_trainer_on_a_running_directory_is_refused(repo, tmp_path):
    """A scheduler restarting a job whose old copy still runs: today both train and interleave metrics.jsonl."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "trainer", "tiny-qwen2.5", "run.episodes=100000",
                              "run.checkpoint_every=1", "--run-dir", str(run_dir)], cwd=repo,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline:
            time.sleep(0.1)
        out = trainer(repo, "--resume", str(run_dir), timeout=60)
        line = one_error_line(out)
        assert f"{run_dir} is in use by another trainer (pid {first.pid})" in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_kill_between_the_checkpoint_and_its_row_loses_no_row(repo, tmp_path, straight):
    run_dir = tmp_path / "run"
    out = trainer(repo, *ARGS, "--run-dir", str(run_dir), fault="kill_before_row_2")
    assert out.returncode == -9 and [r["episode"] for r in rows(run_dir)] == [1]
    assert (run_dir / "checkpoints" / "episode-000002").is_dir()
    out = trainer(repo, "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    same_run(run_dir, straight)


def test_a_bare_resume_continues_the_runs_own_recipe_and_overrides(repo, finished, straight):
    """Today a bare --resume trains the default demo recipe whatever the run was."""
    out = trainer(repo, "--resume", str(finished), "run.episodes=5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["episode"] for r in rows(finished)] == [1, 2, 3, 4, 5]
    assert [deterministic(r) for r in rows(finished)[:4]] == [deterministic(r) for r in rows(straight)]
    assert json.loads((finished / "summary.json").read_text())["recipe"] == "tiny-qwen2.5"


@pytest.mark.parametrize(("given", "expected"), [
    (["grpo.lr=5e-4"], "grpo.lr is 0.002 in the run"),
    (["tiny-qwen3"], "the run is recipe tiny-qwen2.5, not tiny-qwen3"),
    (["tiny-qwen2.5", "run.seed=8"], "run.seed is 7 in the run"),
    (["model.shape.hidden=128"], "model.shape.hidden is 64 in the run"),
])
def test_a_resume_that_changes_the_run_is_refused_naming_both_values(finished, capsys, given, expected):
    before = (finished / "metrics.jsonl").read_bytes()
    assert main(["--resume", str(finished), *given]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert expected in line and ("only run.episodes may change" in line or "no recipe (or tiny-qwen2.5)" in line)
    assert (finished / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("config", ["", "{not json", '{"recipe": "tiny-qwen2.5"}', "[1, 2]"])
def test_a_garbage_config_json_is_an_error(finished, capsys, config):
    (finished / "config.json").write_text(config)
    assert main(["--resume", str(finished)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{finished / 'config.json'}: not a run's config" in line


def test_a_damaged_newest_checkpoint_and_a_torn_metrics_line_resume_from_the_one_before(repo, finished, straight):
    """Today: `PytorchStreamReader failed` on the truncated rank file, `JSONDecodeError` on the torn line."""
    rank_file = finished / "checkpoints" / "episode-000004" / "rank-00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    with (finished / "metrics.jsonl").open("a") as f:
        f.write('{"episode": 5, "reward/me')
    (finished / "checkpoints" / "latest").write_bytes(b"\x00garbage")
    out = trainer(repo, "--resume", str(finished))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (f"skipped checkpoint {finished / 'checkpoints' / 'episode-000004'}: rank-00000.pt has 1000 bytes, "
            "its manifest says") in out.stderr
    same_run(finished, straight)


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(repo, tmp_path, straight):
    """Today --resume says there is no checkpoint and --run-dir says the directory holds a run."""
    run_dir = tmp_path / "run"
    out = trainer(repo, *ARGS, "--run-dir", str(run_dir), fault="kill_in_first_save")
    assert out.returncode == -9 and [r["episode"] for r in rows(run_dir)] == [1]
    out = trainer(repo, "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no complete checkpoint, so the run starts again from episode 0" in out.stderr
    same_run(run_dir, straight)


# --- signals: Ctrl-C and SIGTERM stop after the episode with a checkpoint, one line, exit 130 / 143 -----------------

MULTI = [*ARGS, "layout=dp2", "gpus=2"]


def interrupted(repo, run_dir, args, fault):
    """The run under a planted signal, in its own session (its process group is the terminal's foreground)."""
    env = {**os.environ, "GRPO_STACK_PLANT_FAULT": f"{KILL_POINTS}:{fault}"}
    return subprocess.run([sys.executable, "-m", "trainer", *args, "--run-dir", str(run_dir)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)


def stopped_line(out, run_dir, code):
    assert out.returncode == code and "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"interrupted at episode 1; kept {run_dir / 'checkpoints' / 'episode-000001'}; resume with: "
                    f"python -m trainer --resume {run_dir}")


@pytest.mark.parametrize(("fault", "code"), [("ctrl_c_after_row_1", 130), ("sigterm_to_launcher_after_row_1", 143)])
def test_a_signal_checkpoints_and_the_run_resumes_exactly(repo, tmp_path, straight, fault, code):
    """Today: 99 lines of KeyboardInterrupt (SIGINT), or a silent death (SIGTERM), and nothing kept."""
    run_dir = tmp_path / "run"
    stopped_line(interrupted(repo, run_dir, ARGS, fault), run_dir, code)
    assert [r["episode"] for r in rows(run_dir)] == [1]
    out = trainer(repo, "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    same_run(run_dir, straight)


def test_a_second_ctrl_c_stops_at_once(repo, tmp_path):
    run_dir = tmp_path / "run"
    out = interrupted(repo, run_dir, ARGS, "ctrl_c_twice_after_row_1")
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == "SIGINT again: stopped at once, without a checkpoint"
    assert not (run_dir / "checkpoints" / "episode-000001").exists()


@pytest.fixture(scope="module")
def straight_multi(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight-multi") / "run"
    out = trainer(REPO, *MULTI, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_ctrl_c_on_two_processes_checkpoints_every_rank_and_resumes_exactly(repo, tmp_path, straight_multi):
    """Today: `SignalException` labelled [rank0], exit 1, no checkpoint."""
    run_dir = tmp_path / "run"
    stopped_line(interrupted(repo, run_dir, MULTI, "ctrl_c_after_row_1"), run_dir, 130)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "episode-000001").glob("rank-*")) == [
        "rank-00000.pt", "rank-00001.pt"]
    out = trainer(repo, "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    same_run(run_dir, straight_multi)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigterm_to_launcher_after_row_1", "sigterm_to_group_after_row_1"])
def test_sigterm_to_the_launcher_of_two_processes_stops_every_rank_with_a_checkpoint(repo, tmp_path, fault):
    """To the group: the fork server the ranks come from ignores it (it would take every rank down with it)."""
    run_dir = tmp_path / "run"
    stopped_line(interrupted(repo, run_dir, MULTI, fault), run_dir, 143)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "episode-000001").glob("rank-*")) == [
        "rank-00000.pt", "rank-00001.pt"]


# --- a full disk and bad run paths ------------------------------------------------------------------------------


def tmpfs(mount, size):
    """A tmpfs of ``size`` at ``mount``, made and removed here (root only)."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """2 MiB: one checkpoint of the one-process tiny run fits, two do not."""
    yield from tmpfs(tmp_path / "disk", "2M")


@pytest.fixture
def small_disk_for_two(tmp_path):
    """3 MiB: one checkpoint of the two-process tiny run (two rank files) fits, two do not."""
    yield from tmpfs(tmp_path / "disk", "3M")


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(repo, small_disk, straight):
    """Today: a torch `enforce fail ... unexpected pos` traceback, then resume fails in truncate_after."""
    run_dir = small_disk / "run"
    out = trainer(repo, *ARGS, "--run-dir", str(run_dir))
    line = last_line(out, code=1)
    assert line.startswith(f"error: episode 4: no space left on the device of {run_dir / 'checkpoints'}: the "
                           "checkpoint of episode 4 (this rank's part) needs about 1.1 MiB, ")
    assert line.endswith(f"last good checkpoint: episode 2 in {run_dir / 'checkpoints'})")
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    out = trainer(repo, "--resume", str(run_dir))  # the disk is still full: the same line, nothing lost
    assert last_line(out, code=1) == line
    subprocess.run(["mount", "-o", "remount,size=8M", str(small_disk)], check=True)
    out = trainer(repo, "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    same_run(run_dir, straight)


@pytest.mark.slow
def test_a_full_disk_in_a_two_process_run_is_one_line_and_nothing_half_written(repo, small_disk_for_two):
    """Every rank stops with the first rank's line; both rank files of the last good checkpoint are kept (the
    resume once there is space is the one-process test's: the same code)."""
    run_dir = small_disk_for_two / "run"
    out = trainer(repo, *MULTI, "--run-dir", str(run_dir))
    line = last_line(out, code=1)
    assert line.startswith(f"error: episode 4: no space left on the device of {run_dir / 'checkpoints'}: the "
                           "checkpoint of episode 4 (this rank's part) needs about 1.1 MiB, "), line
    assert line.endswith(f"last good checkpoint: episode 2 in {run_dir / 'checkpoints'})")
    assert sum("error:" in x for x in out.stderr.splitlines()) == 1, out.stderr[-3000:]
    assert not list((run_dir / "checkpoints").rglob(".tmp-*")) and not list(run_dir.rglob("*.tmp"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["episode-000002", "latest"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "episode-000002").iterdir()) == [
        "manifest.json", "rank-00000.pt", "rank-00001.pt"]
    assert [r["episode"] for r in rows(run_dir)] == [1, 2, 3]


def test_a_metrics_row_on_a_full_disk_is_a_disk_full_error(small_disk):
    from trainer.atomic import DiskFull
    from trainer.metrics import MetricsLog

    log = MetricsLog(small_disk)
    with pytest.raises(OSError):  # fill the disk
        (small_disk / "filler").write_bytes(b"x" * (3 << 20))
    with pytest.raises(DiskFull, match=f"no space left on the device of {small_disk}: the metrics row of episode 1"):
        log.log(1, {"reward/mean": 0.5, "padding": "y" * 8192})


@pytest.fixture
def read_only(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize(("flag", "where", "expected"), [
    ("--run-dir", "file/run", "{file} is not a directory"),
    ("--run-dir", "file", "{file} is not a directory"),
    ("--runs", "file", "{file} is not a directory"),
    ("--run-dir", "/dev/null", "/dev/null is not a directory"),
    ("--runs", "/dev/null/runs", "/dev/null is not a directory"),
    ("--run-dir", "RO/run", "cannot write there (a read-only file system)"),
    ("--runs", "RO", "cannot write there (a read-only file system)"),
    ("--runs", "/proc/grpo-stack-runs", "cannot write there"),
])
def test_a_bad_run_path_is_one_line(tmp_path, read_only, capsys, flag, where, expected):
    """Today: NotADirectoryError, OSError [Errno 30] tracebacks."""
    file = tmp_path / "file"
    file.write_text("not a directory")
    path = where.replace("RO", str(read_only)).replace("file", str(file)) if not where.startswith("/") else where
    assert main(["tiny-qwen2.5", flag, path]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {flag} {path}") and expected.format(file=file) in line, line
    assert file.read_text() == "not a directory"


# --- a stuck rank ends the run within run.stall_timeout_s, named --------------------------------------------------


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_the_stall_timeout_naming_it(repo, tmp_path):
    """Today gloo's 1,800 s default applies, and the final error blames rank 0."""
    import psutil

    run_dir, stall = tmp_path / "run", 8
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "tiny-qwen2.5", "run.episodes=100000", "layout=dp2",
                             "gpus=2", f"run.stall_timeout_s={stall}", "--run-dir", str(run_dir)], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 2) and time.time() < deadline:
            time.sleep(0.2)
        ranks = dict(enumerate(local_ranks(psutil.Process(proc.pid))))
        ranks[1].suspend()  # SIGSTOP
        stopped = time.time()
        _, err = proc.communicate(timeout=stall + 60)
        took = time.time() - stopped
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: no rank made progress for {stall} s (run.stall_timeout_s); stuck: rank 1 "
                           "(stopped by a signal); every rank was stopped"), last
    assert took < stall + 30, took  # the watch polls each second; the rest is the shared machine's slack
    assert not [p for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_a_deadlocked_one_process_run_ends_within_the_stall_timeout_naming_where(repo, tmp_path):
    """Today the watch exists only in the launcher of a multi-process run: this run would hang for good."""
    run_dir, stall = tmp_path / "run", 3
    started = time.time()
    out = trainer(repo, "tiny-qwen2.5", "run.episodes=100000", f"run.stall_timeout_s={stall}", "--run-dir",
                  str(run_dir), fault="deadlock_after_row_1", timeout=240)
    line = last_line(out, code=1)
    assert line.startswith(f"error: no progress for {stall} s (run.stall_timeout_s); stuck: the run's one process, "
                           f"its main thread at {KILL_POINTS}:"), line
    assert line.endswith("(deadlock)"), line
    assert line in (run_dir / "train.log").read_text().splitlines()  # said at once, so the log has it too
    assert [r["episode"] for r in rows(run_dir)] == [1]
    assert time.time() - started < 240


# --- run directories a team can use --------------------------------------------------------------------------------


def test_the_run_directory_records_its_provenance_and_is_readable_by_the_team(straight):
    """Today config.json, summary.json and latest are 0600, rows carry no time, and nothing says what code ran."""
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "summary.json", "metrics.jsonl", "provenance.json", "checkpoints/latest",
                 "checkpoints/episode-000004/manifest.json", "checkpoints/episode-000004/rank-00000.pt"):
        assert (straight / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    clocks = [r["clock/unix"] for r in rows(straight)]
    assert clocks == sorted(clocks) and time.time() - 3600 < clocks[0]
    (session,) = json.loads((straight / "provenance.json").read_text())["sessions"]
    assert len(session["git_revision"]) == 40 and isinstance(session["git_dirty"], bool)
    assert session["versions"]["torch"] and session["versions"]["megatron-core"]
    assert session["argv"][:1] == ["tiny-qwen2.5"] and "image_fingerprint" in session
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["wall_time_s"] > 0 and summary["memory/peak_rss_mib"] > 0
    log = (straight / "train.log").read_text()
    assert "\r" not in log and log.splitlines()[-1] == f"run directory: {straight}"
    assert [line for line in log.splitlines() if line.startswith("tiny-qwen2.5:")] == [
        next(line for line in log.splitlines() if line.startswith("tiny-qwen2.5: 100%"))]  # the bar, once


def test_a_full_disk_inside_a_distributed_checkpoint_is_a_full_disk():
    """FSDP2's checkpoints are torch distributed checkpoints: a rank's ENOSPC reaches every rank inside DCP's
    CheckpointException (a BaseException), which the checkpoint must read as a full disk, not let escape."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.atomic import is_disk_full

    full = CheckpointException("save failed", {1: (OSError(errno.ENOSPC, "No space left on device"), None)})
    other = CheckpointException("save failed", {0: (ValueError("bad plan"), None)})
    assert is_disk_full(full) and not is_disk_full(other)
