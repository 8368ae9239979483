"""Two real network hosts on this machine: network namespaces joined by a veth pair, a Ray head in one and a Ray worker
in the other, each bound to its own address. Runs with ranks on both hosts equal the local launcher's, an
equivalence gate replays over Ray, and a host lost mid-run ends the run in seconds naming the rank, or, with
run.max_restarts, is survived with the final weights of an uninterrupted run.

Everything the module makes (namespaces, the veth pair, Ray's processes and temp directory) is removed at its end,
whatever the outcome: every process in a namespace is killed before the namespace is deleted.
"""

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[3]
RAY = str(Path(sys.executable).parent / "ray")
HEAD, WORKER = "10.77.0.1", "10.77.0.2"
PORT = 6390
# a host lost is declared dead after health_check_period_ms × failure_threshold (Ray's default: 3 s × 5)
RAY_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_USAGE_STATS_ENABLED": "0"}
# the tiny dense recipe with an entropy bonus: non-zero gradients from the first episode with no warm start (which
# would cost each rank minutes here); a checkpoint per episode
RECIPE = ["tiny-qwen2.5", "grpo.entropy_coef=0.01", "run.seed=3", "run.checkpoint_every=1"]
DP2 = [*RECIPE, "run.episodes=3", "layout=dp2", "gpus=2", "gpus_per_node=1"]
HOLD_FAULT = str(Path(__file__).with_name("faults.py")) + ":hold_after_the_first_checkpoint"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="network namespaces need root and iproute2"),
]


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Hosts:
    """Two namespaces ``<prefix>0`` (the head, HEAD) and ``<prefix>1`` (the worker, WORKER) on one veth pair."""

    def __init__(self, prefix: str, temp: Path):
        self.prefix, self.temp = prefix, temp
        self.head, self.worker = f"{prefix}0", f"{prefix}1"

    def create(self) -> None:
        sh("ip", "netns", "add", self.head)
        sh("ip", "netns", "add", self.worker)
        sh("ip", "link", "add", f"{self.prefix}v0", "type", "veth", "peer", "name", f"{self.prefix}v1")
        for i, (ns, address) in enumerate(((self.head, HEAD), (self.worker, WORKER))):
            sh("ip", "link", "set", f"{self.prefix}v{i}", "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", f"{self.prefix}v{i}")
            sh("ip", "-n", ns, "link", "set", f"{self.prefix}v{i}", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def on(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, "env", *(f"{k}={v}" for k, v in RAY_ENV.items()), *cmd]

    def start_head(self) -> None:
        sh(*self.on(self.head, RAY, "start", "--head", f"--node-ip-address={HEAD}", f"--port={PORT}", "--num-cpus=2",
                    "--include-dashboard=false", f"--temp-dir={self.temp}"), timeout=120)

    def start_worker(self) -> None:
        sh(*self.on(self.worker, RAY, "start", f"--address={HEAD}:{PORT}", f"--node-ip-address={WORKER}",
                    "--num-cpus=2"), timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the head counts the worker's node alive
            status = sh(*self.on(self.head, RAY, "status", f"--address={HEAD}:{PORT}"), check=False, timeout=60)
            if status.stdout.count("node_") >= 2 and "Pending:\n (no pending nodes)" in status.stdout:
                return
            time.sleep(1)
        raise AssertionError("the worker host's Ray node did not join the head")

    def pids(self, ns: str) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]

    def kill_all(self, ns: str) -> None:
        """SIGKILL every process in the namespace (a host lost: its Ray processes and the ranks they started)."""
        for pid in self.pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while self.pids(ns) and time.monotonic() < deadline:
            time.sleep(0.1)

    def remove(self) -> None:
        for ns in (self.head, self.worker):
            self.kill_all(ns)
            sh("ip", "netns", "delete", ns, check=False)  # the veth pair goes with its namespaces
        shutil.rmtree(self.temp, ignore_errors=True)

    def ranks(self, ns: str) -> list[str]:
        """Command lines of the run's rank actors still alive in the namespace."""
        lines = []
        for pid in self.pids(ns):
            try:
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
        return [line for line in lines if "RankActor" in line]


@pytest.fixture(scope="module")
def hosts():
    # short: Ray's unix sockets live under the temp directory (108-byte path limit)
    h = Hosts(f"grpo{os.getpid() % 100000}", Path(tempfile.mkdtemp(prefix="gr-", dir="/tmp")))
    try:
        h.create()
        h.start_head()
        h.start_worker()
        yield h
    finally:
        h.remove()


def trainer(*args: str, ns: str | None = None, hosts: Hosts | None = None, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer", *args]
    if ns:
        cmd = hosts.on(ns, *cmd)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kw)


def on_ray(*args: str) -> list[str]:
    return [*args, "--launcher", "ray", "--ray-address", f"{HEAD}:{PORT}"]


def rows(run_dir: Path) -> list[dict]:
    """The deterministic part of each metrics row (no clocks, timings, memory)."""
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "memory/", "clock/"))}
            for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's last checkpoint (weights, optimizer state), by rank file and path."""
    episode = (run_dir / "checkpoints" / "latest").read_text().strip()
    out = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            out[path] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}/{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")

    for rank_file in sorted((run_dir / "checkpoints" / episode).glob("rank-*.pt")):
        walk(torch.load(rank_file, weights_only=False), rank_file.name)
    return out


def assert_same_state(ours: Path, theirs: Path) -> None:
    a, b = final_tensors(ours), final_tensors(theirs)
    assert sorted(a) == sorted(b) and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


@pytest.fixture(scope="module")
def local_dp2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "dp2"
    out = trainer(*DP2, "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_tp2_pp2_over_two_hosts_equals_the_local_launcher(hosts, tmp_path):
    # TP pairs inside a host (ranks 0-1 on one, 2-3 on the other), the pipeline across the veth pair
    args = [*RECIPE, "run.episodes=2", "layout=tp2pp2", "gpus=4", "gpus_per_node=2", "--matrix",
            str(_matrix_with_tp2pp2(tmp_path))]
    local, ray_run = tmp_path / "local", tmp_path / "ray"
    out = trainer(*args, "--run-dir", str(local))
    assert out.returncode == 0, out.stderr[-3000:]
    out = trainer(*on_ray(*args, "--run-dir", str(ray_run)), ns=hosts.head, hosts=hosts)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rows(ray_run) == rows(local)
    assert_same_state(ray_run, local)


def _matrix_with_tp2pp2(tmp_path: Path) -> Path:
    text = (REPO / "matrix.yaml").read_text().replace("\n  dp2: {dp: 2}\n", "\n  dp2: {dp: 2}\n  tp2pp2: {tp: 2, pp: 2}\n")
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    return path


def test_an_equivalence_gate_replays_over_ray_across_hosts(hosts, tmp_path):
    # pp-equivalence on its recipe with nodes of one rank each, so the PP candidate's two stages sit on two hosts
    # (a TP candidate could not: TP stays inside a node); a shorter warm start (the rollout both layouts replay is
    # prepared once, on one process: its rewards do not matter here)
    data = yaml.safe_load((REPO / "matrix.yaml").read_text())
    recipe = copy.deepcopy(data["recipes"]["gates-dense"])
    recipe["gpus_per_node"], recipe["run"]["warm_start_steps"] = 1, 20
    data["recipes"]["gates-dense-hosts"] = recipe
    data["gates"] = {"pp-over-hosts": {**data["gates"]["pp-equivalence"], "recipe": "gates-dense-hosts"}}
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump(data))
    verdicts = {}
    for launcher in ("local", "ray"):  # one prepared rollout (the cache), replayed by each launcher
        cmd = [sys.executable, "-m", "trainer.equivalence", "--matrix", str(tmp_path / "matrix.yaml"), "--out",
               str(tmp_path / launcher), "--cache", str(tmp_path / "cache"), "--launcher", launcher]
        if launcher == "ray":
            cmd = hosts.on(hosts.head, *cmd, "--ray-address", f"{HEAD}:{PORT}")
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode in (0, 1), out.stdout[-2000:] + out.stderr[-2000:]  # 1: the gate's verdict is FAIL
        verdicts[launcher] = json.loads((tmp_path / launcher / "pp-over-hosts" / "verdict.json").read_text())
    assert f"ip={WORKER})" in out.stdout + out.stderr  # a stage ran on the worker host
    # the gate recomputed over Ray measures exactly what it measures under the local launcher
    assert verdicts["ray"]["rows"] == verdicts["local"]["rows"] and verdicts["ray"]["passed"] == verdicts["local"]["passed"]
    assert {r["quantity"]: r["passed"] for r in verdicts["ray"]["rows"]}["logprobs max abs"]


RANKS = """
import os, time
from pathlib import Path

def fail_on_rank_1():
    if os.environ["RANK"] == "1":
        Path(__file__).with_name("raised_at").write_text(repr(time.time()))  # both hosts share this machine's clock
        raise ValueError("planted on rank 1")
    time.sleep(120)  # rank 0 outlives it unless the launcher stops it
"""

DRIVER = """
import sys, time
import ray
from trainer.parallel.launcher import RankFailed, launch
import ranks

try:
    launch(ranks.fail_on_rank_1, 2, launcher="ray", ray_address=sys.argv[1], ranks_per_node=1)
except RankFailed as exc:
    print(f"RankFailed at {time.time()!r}: {exc}")
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level="ERROR")
print("groups:", sorted({g["state"] for g in ray.util.placement_group_table().values()}))
"""


def test_a_rank_that_raises_stops_every_rank_in_seconds_and_leaves_nothing(hosts, tmp_path):
    (tmp_path / "ranks.py").write_text(RANKS)
    cmd = hosts.on(hosts.head, f"PYTHONPATH={tmp_path}{os.pathsep}{REPO}", sys.executable, "-c", DRIVER,
                   f"{HEAD}:{PORT}", HEAD)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    failed = next((x for x in out.stdout.splitlines() if x.startswith("RankFailed")), out.stdout + out.stderr)
    assert "rank 1 (node 10.77.0." in failed and "failed: ValueError: planted on rank 1" in failed, failed
    # Timed from the raise, not from the launch: starting Ray actors on a loaded machine takes anything up to a minute.
    stopped_after = float(failed.split()[2].rstrip(":")) - float((tmp_path / "raised_at").read_text())
    print(f"the run stopped {stopped_after:.1f} s after rank 1 raised")
    assert stopped_after < 15  # rank 0 would have slept 120 s
    assert "groups: ['REMOVED']" in out.stdout  # the placement group of the run removed
    assert not hosts.ranks(hosts.head) and not hosts.ranks(hosts.worker)  # no rank actor left on either host


def test_dp2_over_two_hosts_survives_a_lost_host_and_equals_the_local_launcher(hosts, local_dp2, tmp_path):
    """A dp2 run with one rank per host; the worker host's processes killed once the episode-1 checkpoint is written
    (a planted fault holds the ranks there): the failure is reported within 30 s naming the lost rank, no rank is
    left on either host, and with run.max_restarts 1 and the host back the run finishes. Its metrics rows (episode 1
    before the loss, 2 and 3 after) and every tensor of its final checkpoint equal the local launcher's
    uninterrupted run bit for bit: the same ranks, the same reduction order, an exact resume."""
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    env = {**os.environ, "GRPO_STACK_PLANT_FAULT": HOLD_FAULT, "GRPO_STACK_TEST_HOLD": str(hold)}
    cmd = hosts.on(hosts.head, *[sys.executable, "-m", "trainer",
                                 *on_ray(*DP2, "run.max_restarts=1", "--run-dir", str(run_dir))])
    log = tmp_path / "stderr"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=err, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "episode-000001" / "manifest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        killed = time.monotonic()
        hosts.kill_all(hosts.worker)
        while "restart 1 of 1" not in log.read_text():
            assert time.monotonic() - killed < 30, log.read_text()[-3000:]
            time.sleep(0.2)
        reported = time.monotonic() - killed
        line = next(x for x in log.read_text().splitlines() if "restart 1 of 1" in x)
        assert "was lost" in line and "node 10.77.0.2" in line, line
        assert not hosts.ranks(hosts.head) and not hosts.pids(hosts.worker)  # no rank of the run left anywhere
        hold.unlink()
        hosts.start_worker()
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"failure reported {reported:.1f} s after the host was killed")
    assert re.search(rf"\(rank [01] pid=\d+, ip={WORKER}\)", log.read_text())  # a rank's output from the worker host
    got = rows(run_dir)
    assert got == rows(local_dp2) and all(r["grad_norm"] > 0 for r in got)
    assert_same_state(run_dir, local_dp2)


STOP_FAULT = f"{REPO / 'tests' / 'trainer' / 'loop' / 'kill_points.py'}:rank_1_stops_after_episode_2"


def _popen_on_head(hosts: Hosts, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    cmd = hosts.on(hosts.head, *[sys.executable, "-m", "trainer", *on_ray(*args)])
    with log.open("w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=err, stderr=subprocess.STDOUT,
                                text=True)


def test_sigterm_to_the_driver_checkpoints_the_ranks_on_both_hosts_and_resumes_exactly(hosts, local_dp2, tmp_path):
    """A scheduler's SIGTERM reaches the driver only; the rank on the worker host gets it from the driver, and both
    ranks checkpoint after episode 1 (they hold there, planted, until the signal has been passed on)."""
    run_dir, hold, log = tmp_path / "run", tmp_path / "hold", tmp_path / "stderr"
    hold.touch()
    proc = _popen_on_head(hosts, [*DP2, "--run-dir", str(run_dir)], log, GRPO_STACK_PLANT_FAULT=HOLD_FAULT,
                          GRPO_STACK_TEST_HOLD=str(hold))
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert len(hosts.ranks(hosts.worker)) == 1
        os.kill(proc.pid, 15)  # `ip netns exec` execs: this is the driver
        time.sleep(3)
        hold.unlink()
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and text.strip().splitlines()[-1].startswith("interrupted at episode 1; kept "), text[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "episode-000001").glob("rank-*")) == [
        "rank-00000.pt", "rank-00001.pt"]
    assert not hosts.ranks(hosts.head) and not hosts.ranks(hosts.worker)
    out = trainer(*on_ray("--resume", str(run_dir)), ns=hosts.head, hosts=hosts)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rows(run_dir) == rows(local_dp2)
    assert_same_state(run_dir, local_dp2)


def test_a_stopped_rank_on_the_worker_host_ends_the_run_within_the_stall_timeout_naming_it(hosts, tmp_path):
    run_dir, log, stall = tmp_path / "run", tmp_path / "stderr", 8
    args = [*RECIPE, "run.episodes=100000", "run.checkpoint_every=0", "layout=dp2", "gpus=2", "gpus_per_node=1",
            f"run.stall_timeout_s={stall}", "--run-dir", str(run_dir)]
    proc = _popen_on_head(hosts, args, log, GRPO_STACK_PLANT_FAULT=STOP_FAULT)
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        started = time.monotonic()
        assert proc.wait(timeout=stall + 90) == 1, log.read_text()[-3000:]
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: no rank made progress for {stall} s (run.stall_timeout_s); stuck: rank 1 "
                           "(stopped by a signal); every rank was stopped"), last
    assert took < stall + 40, took
    assert not hosts.ranks(hosts.head) and not hosts.ranks(hosts.worker)
