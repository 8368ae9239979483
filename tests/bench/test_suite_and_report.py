"""The bench end to end on a real 2-episode single-layout suite: a result with its environment, derived
MFU and peak memory; a report (markdown, self-contained HTML, PNG, CSV) of it; failed runs recorded."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.peak import Peak
from bench.result import load_result
from bench.suite import Plan, run_cell

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_suite_writes_a_result_with_environment_and_derived_metrics(smoke_result, repo):
    result = load_result(smoke_result)
    (cell,) = result.cells
    assert (cell.recipe, cell.layout, cell.gpus, cell.status) == ("tiny-qwen2.5", "single", 1, "ok")
    assert [r["episode"] for r in cell.episodes] == [1, 2]
    steady = cell.episodes[1]
    assert 0 < steady["bench/mfu_train"] < 1 and steady["bench/mfu_episode"] < steady["bench/mfu_train"]
    assert steady["bench/tokens_per_s_per_device"] == steady["throughput/tokens_per_s"]
    assert cell.peak_rss_mib > 100  # torch + megatron alone take more
    assert result.peak.device == "cpu" and result.peak.flops_per_s > 1e8 and "measured" in result.peak.source
    env = result.environment
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert env["git"]["revision"] == head
    assert env["versions"]["torch"].startswith("2.13.0") and env["versions"]["megatron-core"] == "0.16.1"
    assert set(env["locks_sha256"]) >= {"cpu.lock.txt"}
    # the run directory the numbers came from holds the same rows
    rows = [json.loads(line) for line in (Path(cell.run_dir) / "metrics.jsonl").open()]
    assert rows[1]["time/episode"] == steady["time/episode"]


@pytest.mark.slow
def test_report_of_a_result_against_itself_flags_nothing(smoke_result, repo, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "bench", "report", str(smoke_result), str(smoke_result),
                           "--out", str(out), "--fail-on-regression"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 regression(s)" in proc.stdout
    for name in ("stage_times.png", "tokens_per_s.png", "mfu.png", "reward.png"):
        assert (out / name).read_bytes().startswith(PNG)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert not re.search(r'src="(?!data:)', html)  # self-contained: nothing fetched from elsewhere
    assert "tiny-qwen2.5" in (out / "report.md").read_text()
    assert "tiny-qwen2.5" in (out / "comparison.csv").read_text()


def test_a_run_past_its_time_limit_is_killed_and_recorded_as_failed(tmp_path, repo):
    plan = Plan("tiny-qwen2.5", "tiny-qwen2.5", "single", 1, ("run.episodes=50",))
    started = time.monotonic()
    cell = run_cell(plan, 0, image="host", matrix_path=repo / "matrix.yaml", cell_dir=tmp_path / "cell",
                    peak=Peak(device="cpu", flops_per_s=1e11, per_device=False, source="test"), timeout=2, cwd=repo)
    assert time.monotonic() - started < 30
    assert cell.status == "failed" and cell.returncode == -9 and cell.episodes == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "cell") not in ps  # no process of the run outlives it


def test_failed_cells_are_recorded_and_the_suite_goes_on(bench_matrix, tmp_path, repo):
    # the trainer's preflight refuses a data file that is not there (exit 2), after the bench's checks passed
    text = bench_matrix.read_text() + ("  failing:\n    recipes: [tiny-qwen2.5]\n    episodes: 2\n    overrides: "
                                       "{data.source: math-lighteval, data.path: data/absent.parquet}\n")
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "failing", "--matrix", str(matrix),
                           "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "results").glob("failing-*.json")
    (cell,) = load_result(path).cells
    assert cell.status == "failed" and cell.returncode == 2 and "data file data/absent.parquet" in cell.stderr_tail


@pytest.mark.slow
def test_relative_paths_are_resolved_against_the_working_directory(bench_matrix, tmp_path, repo):
    """`--matrix`, `--results` and `--runs` relative to where the command is typed, though the trainer runs it
    starts work in the repository: its cell must read this matrix (whose recipe `here-only` the committed one lacks;
    it then stops in the preflight on the absent data file, a quick failure recorded in the result)."""
    recipe = ('  here-only:\n    <<: *tiny\n    data: {source: math-lighteval, path: data/absent.parquet}\n'
              '    run: {episodes: 2}\n\n  demo:\n')
    text = bench_matrix.read_text().replace("\n  demo:\n", "\n" + recipe, 1)
    (tmp_path / "here.yaml").write_text(text + "  relative:\n    recipes: [here-only]\n    episodes: 2\n")
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "relative", "--matrix", "here.yaml",
                           "--results", "results", "--runs", "runs"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "results").glob("relative-*.json")
    (cell,) = load_result(path).cells
    assert cell.status == "failed" and "data file data/absent.parquet" in cell.stderr_tail, cell.stderr_tail
    assert Path(cell.run_dir).is_relative_to(tmp_path / "runs")


@pytest.mark.parametrize(("args", "words"), [
    (["run", "no-such-suite"], "unknown suite 'no-such-suite'; suites in"),
    (["report", "no-such-result.json"], "no-such-result.json: no such result file"),
    (["report", "pyproject.toml"], "pyproject.toml: not a bench result"),
    (["report", "--threshold", "5", "pyproject.toml"], "--threshold 5.0: expected a fraction"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, repo):
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_a_suite_cell_the_trainer_would_refuse_fails_before_any_run(bench_matrix, tmp_path, repo):
    text = bench_matrix.read_text() + "  typo:\n    recipes: [tiny-qwen2.5]\n    overrides: {grpo.lrr: 0.1}\n"
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "typo", "--matrix", str(matrix),
                           "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")],
                          cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "suite entry tiny-qwen2.5 on layout single: override 'grpo.lrr': unknown key 'lrr'" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
