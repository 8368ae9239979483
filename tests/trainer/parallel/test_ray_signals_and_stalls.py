"""Under the Ray launcher as under the local one: Ctrl-C or SIGTERM to the driver checkpoints every rank after the
same episode and the run resumes exactly; a second Ctrl-C stops every rank at once; a stuck rank ends the run
within run.stall_timeout_s, named. Each run starts its own one-host Ray cluster (the launcher's local one) and
leaves no rank process behind.

Before: the driver's signal never reached the ranks (Ray's workers block SIGINT, and nothing forwarded it), so Ctrl-C
tore the actors down without a checkpoint; a stopped rank held every other one until gloo's collective timeout.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
HOLD_FAULT = f"{Path(__file__).with_name('faults.py')}:hold_after_the_first_checkpoint"
STOP_FAULT = f"{REPO / 'tests' / 'trainer' / 'loop' / 'kill_points.py'}:rank_1_stops_after_episode_2"
ARGS = ["tiny-qwen2.5", "run.episodes=4", "run.checkpoint_every=2", "run.seed=7", "grpo.lr=2e-3", "layout=dp2", "gpus=2"]

pytestmark = pytest.mark.slow


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "memory/", "clock/"))}
            for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def rank_files(run_dir: Path, episode: int) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / f"episode-{episode:06d}").glob("rank-*.pt"))


def final_weights(run_dir: Path) -> list[dict]:
    return [torch.load(path, weights_only=False)["policy"]["model"]
            for path in sorted((run_dir / "checkpoints" / "episode-000004").glob("rank-*.pt"))]


class RayRun:
    """``python -m trainer ... --launcher ray`` in its own session (its process group stands for the terminal's),
    with a planted fault; ``ranks()`` are the processes that carry this run's tag (Ray passes GRPO_STACK_* on)."""

    def __init__(self, tmp_path: Path, fault: str, *args: str):
        self.run_dir, self.hold, self.tag = tmp_path / "run", tmp_path / "hold", str(tmp_path)
        self.hold.touch()
        env = {**os.environ, "GRPO_STACK_PLANT_FAULT": fault, "GRPO_STACK_TEST_HOLD": str(self.hold),
               "GRPO_STACK_TEST_TAG": self.tag}
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer", *ARGS, *args, "--launcher", "ray", "--run-dir",
                                      str(self.run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)

    def wait_for_rows(self, n: int) -> None:
        deadline = time.monotonic() + 240
        metrics = self.run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.communicate()[1][-3000:]
            time.sleep(0.2)

    def ranks(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("GRPO_STACK_TEST_TAG") == self.tag and "RankActor" in " ".join(proc.cmdline()):
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            self.proc.kill()
        return self.proc.returncode, err


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same run uninterrupted, under the local launcher."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = subprocess.run([sys.executable, "-m", "trainer", *ARGS, "--run-dir", str(run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


# SIGTERM to the driver alone, the same path over a cluster of two hosts: test_two_hosts.py (one Ray run less here).
@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGINT, True)], ids=["ctrl-c"])
def test_a_signal_to_the_ray_driver_checkpoints_every_rank_and_resumes_exactly(tmp_path, straight, signum, to_group):
    run = RayRun(tmp_path, HOLD_FAULT)
    run.wait_for_rows(1)  # every rank holds after episode 1 while the hold file exists
    ranks = run.ranks()
    assert len(ranks) == 2
    (os.killpg if to_group else os.kill)(run.proc.pid, signum)
    time.sleep(3)  # the driver passes it on within a second
    run.hold.unlink()
    code, err = run.finish()
    assert code == 128 + signum and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"interrupted at episode 1; kept {run.run_dir / 'checkpoints' / 'episode-000001'}"
                                            f"; resume with: python -m trainer --resume {run.run_dir}")
    assert rank_files(run.run_dir, 1) == ["rank-00000.pt", "rank-00001.pt"]
    assert not alive(ranks)
    out = subprocess.run([sys.executable, "-m", "trainer", "--resume", str(run.run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rows(run.run_dir) == rows(straight)
    for ours, theirs in zip(final_weights(run.run_dir), final_weights(straight), strict=True):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_second_ctrl_c_stops_every_ray_rank_at_once(tmp_path):
    run = RayRun(tmp_path, HOLD_FAULT)
    run.wait_for_rows(1)
    ranks = run.ranks()
    os.kill(run.proc.pid, signal.SIGINT)
    time.sleep(2)
    os.kill(run.proc.pid, signal.SIGINT)  # the ranks still hold: only stopping them ends the run
    code, err = run.finish(timeout=60)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "SIGINT again: stopped at once, without a checkpoint"
    assert not (run.run_dir / "checkpoints" / "episode-000001").exists()
    assert len(ranks) == 2 and not alive(ranks)


def test_a_stopped_ray_rank_ends_the_run_within_the_stall_timeout_naming_it(tmp_path):
    stall = 8
    run = RayRun(tmp_path, STOP_FAULT, "run.episodes=100000", f"run.stall_timeout_s={stall}")
    run.wait_for_rows(2)  # rank 1 stops itself after episode 2
    ranks = run.ranks()
    started = time.monotonic()
    code, err = run.finish(timeout=stall + 90)
    took = time.monotonic() - started
    assert code == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: no rank made progress for {stall} s (run.stall_timeout_s); stuck: rank 1 "
                           "(stopped by a signal); every rank was stopped"), last
    assert took < stall + 40, took  # polled each second; Ray's teardown and the shared machine's slack
    assert len(ranks) == 2 and not alive(ranks)
