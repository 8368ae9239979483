"""Run a benchmark suite of the matrix: every entry × layout × repeat through `python -m trainer`.

The bench drives the trainer only through its public entry point and reads only what a run writes
(`config.json`, `metrics.jsonl`, `summary.json`). A run that fails is recorded as a failed cell with the
tail of its stderr and the suite goes on; a failure is deterministic, so its later repeats are skipped.
Every cell's input is resolved before the first run starts, so a bad suite fails at once (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from bench.derived import derive
from bench.environment import capture
from bench.peak import Peak, device_peak
from bench.result import Cell, Result
from matrix import load_matrix
from matrix.layout import derived_sizes
from matrix.schema import Benchmark, Matrix
from trainer.config import TrainerInputError, parse_overrides, resolve

STDERR_TAIL = 4000  # characters of a failed run's stderr kept in the result


class SuiteError(Exception):
    """A suite that cannot run as declared (unknown name, a cell the trainer would refuse): exit 2."""


@dataclass(frozen=True)
class Plan:
    """One entry × layout of a suite, as the trainer will be called."""

    name: str
    recipe: str
    layout: str
    gpus: int
    overrides: tuple[str, ...]

    def command(self, matrix_path: Path, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "trainer", self.recipe, *self.overrides,
                "--matrix", str(matrix_path), "--run-dir", str(run_dir)]


def _as_text(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def plan(m: Matrix, suite: Benchmark, matrix_path: Path) -> list[Plan]:
    """The suite's cells with their exact overrides, each checked by the trainer's own resolver."""
    plans = []
    for entry in suite.entries():
        name, recipe = entry.label, entry.recipe
        for layout in entry.layouts or suite.layouts or [m.recipes[recipe].layout]:
            gpus, _ = derived_sizes(m.layouts[layout], 1)
            overrides = {**suite.overrides, **entry.overrides, "layout": layout, "gpus": gpus,
                         "run.episodes": suite.episodes}
            texts = tuple(f"{k}={_as_text(v)}" for k, v in overrides.items())
            try:
                resolve(recipe, parse_overrides(list(texts)), matrix_path)
            except TrainerInputError as exc:
                raise SuiteError(f"suite entry {name} on layout {layout}: {exc}") from None
            plans.append(Plan(name, recipe, layout, gpus, texts))
    return plans


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, float | None]:
    """Exit code and peak RSS (MiB, the largest of the run's processes) of `proc`; its process group is
    killed when it runs past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            _kill_group(proc)
        time.sleep(0.2)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_cell(p: Plan, repeat: int, *, image: str, matrix_path: Path, cell_dir: Path, peak: Peak,
             timeout: float, cwd: Path, env: dict[str, str] | None = None) -> Cell:
    """One run into `cell_dir`/run (the trainer wants a fresh directory); its stdout/stderr beside it."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    run_dir = cell_dir / "run"
    command = p.command(matrix_path, run_dir)
    started = time.perf_counter()
    with (cell_dir / "stdout.txt").open("w") as out, (cell_dir / "stderr.txt").open("w") as err:
        # its own process group, so a timeout also ends the ranks a launcher started
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd, start_new_session=True,
                                env=os.environ | (env or {}))
        try:
            code, rss = _wait(proc, timeout)
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
    seconds = time.perf_counter() - started
    cell = dict(load_average=os.getloadavg(), recipe=p.name, layout=p.layout, image=image, gpus=p.gpus, repeat=repeat, returncode=code,
                seconds=seconds, command=command, run_dir=str(run_dir), peak_rss_mib=rss)
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.json"
    if code != 0 or not metrics.exists():
        tail = (cell_dir / "stderr.txt").read_text(errors="replace")[-STDERR_TAIL:]
        return Cell(status="failed", stderr_tail=tail, **cell)
    resolved = json.loads(config.read_text())
    total_peak = peak.total(resolved["resolved"]["recipe"]["gpus"])
    rows = [derive(json.loads(line), resolved, total_peak) for line in metrics.read_text().splitlines() if line]
    ranks_rss = [r["memory/peak_rss_mib"] for r in rows if r.get("memory/peak_rss_mib") is not None]
    return Cell(status="ok", episodes=rows, **(cell | {"peak_rss_mib": max([*ranks_rss, rss or 0.0])}))


def run_suite(name: str, *, root: Path, matrix_path: Path, results_dir: Path, runs_dir: Path,
              timeout: float = 1800.0) -> Path:
    """Run suite `name` and write its result; returns the result file's path."""
    m = load_matrix(matrix_path)
    if name not in m.benchmarks:
        raise SuiteError(f"unknown suite '{name}'; suites in {matrix_path}: {', '.join(m.benchmarks) or '(none)'}")
    suite = m.benchmarks[name]
    plans = plan(m, suite, matrix_path)
    environment = capture(root, matrix_path)
    rev = (environment["git"]["revision"] or "norev")[:8]
    result_id = f"{name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{rev}"
    peak = device_peak()
    image = environment["image"]["name"]
    cells: list[Cell] = []
    failed: set[Plan] = set()
    todo = [(r, p) for r in range(suite.repeats) for p in plans]  # repeats interleaved: drift spreads out
    with tqdm(todo, desc=f"bench {name}", unit="run") as bar:
        for repeat, p in bar:
            if p in failed:
                continue
            bar.set_postfix_str(f"{p.name} {p.layout} #{repeat}")
            cell = run_cell(p, repeat, image=image, matrix_path=matrix_path, peak=peak, timeout=timeout, cwd=root,
                            env=suite.env, cell_dir=runs_dir / result_id / f"{p.name}--{p.layout}--r{repeat}")
            if cell.status == "failed":
                failed.add(p)
                bar.write(f"failed: {p.name} on {p.layout} (exit {cell.returncode}): "
                          f"{cell.stderr_tail.strip().splitlines()[-1] if cell.stderr_tail.strip() else ''}")
            cells.append(cell)
    result = Result(id=result_id, suite=name, created=datetime.now(UTC).isoformat(timespec="seconds"),
                    settings=suite.model_dump(mode="json"), environment=environment, peak=peak, cells=cells)
    return result.write(results_dir)
