"""`python -m trainer.smoke` (what `nox -s smoke` runs): every family's tiny recipe in fp32 and bf16, one episode.

In fp32 the torch engine and the trainer compute the same numbers (measured gap ~1e-6); in bf16 the trainer
rounds activations to 8 significant bits, so its log-probs leave the fp32 engine's by ~1e-3–2e-2 (measured
2.3e-3–1.9e-2) and the bf16 model's leave the fp32 model's on the same weights by ~3e-3. A bf16 that silently
computed in fp32 would show gaps of ~1e-6 and fail here; one that broke the model would show gaps near 1 or more.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

FAULTS = Path(__file__).parent / "smoke_faults.py"


def smoke(repo, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.smoke", "--episodes", "1", "--json", str(out), *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_smoke_runs_every_family_in_fp32_and_bf16(repo, tmp_path):
    out = tmp_path / "smoke.json"
    result = smoke(repo, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bf16-fp32 gap" in result.stdout
    numbers = json.loads(out.read_text())
    assert numbers["environment"]["device"].startswith("cpu") and numbers["environment"]["megatron-core"]
    assert set(numbers["families"]) == {"dense", "mla-moe", "qwen3-next", "fsdp2"}
    for family, row in numbers["families"].items():
        assert row["fp32"]["engine_gap"] < 1e-4, (family, row)
        assert 1e-4 < row["bf16"]["engine_gap"] < 0.1, (family, row)
        assert 1e-4 < row["bf16_fp32_gap"] < 0.1, (family, row)
        assert all(r["s_per_episode"] > 0 and r["peak_mib"] > 0 for r in (row["fp32"], row["bf16"])), (
            family,
            row,
        )


def _processes_marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SMOKE_TEST_MARK") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_a_failing_cell_costs_only_itself_and_the_rest_is_measured(repo, tmp_path):
    """The first GPU machine may hit a crash, a hang or an exception anywhere: each ends its own cell (a dead or
    hung process the rest of its family), the other families still run, every failure is named in the table and
    the JSON with its traceback, the exit code is 1, and no process is left behind."""
    out, mark = tmp_path / "smoke.json", uuid.uuid4().hex
    result = smoke(repo, out, "--families", "dense,fsdp2", "--timeout", "15",
                   env={"GRPO_STACK_PLANT_FAULT": f"{FAULTS}:raise_hang_or_die", "SMOKE_TEST_MARK": mark})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    families = json.loads(out.read_text())["families"]
    dense, fsdp2 = families["dense"], families["fsdp2"]
    assert dense["fp32"]["error"] == "RuntimeError: planted: the fp32 run raises"
    assert "smoke_faults.py" in dense["fp32"]["traceback"]
    assert dense["bf16"] == {"error": "timed out after 15 s (--timeout)"}
    assert dense["bf16_fp32_gap"] == {"error": "not run: bf16 ended the family's process"}
    assert fsdp2["fp32"]["engine_gap"] < 1e-4  # the next family ran, and its first run was measured
    assert fsdp2["bf16"] == {"error": "the family's process died (killed by SIGKILL)"}
    assert "failed: dense fp32: RuntimeError: planted: the fp32 run raises" in result.stdout
    assert "failed: fsdp2 bf16: the family's process died (killed by SIGKILL)" in result.stdout
    deadline = time.monotonic() + 5
    while _processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_marked(mark) == []


@pytest.mark.parametrize(("args", "named"), [(["--families", "dense,gpt2"], "--families: unknown gpt2"),
                                             (["--episodes", "0"], "--episodes: 0"),
                                             (["--timeout", "0"], "--timeout: 0")])
def test_bad_arguments_are_one_line_and_exit_2(args, named, capsys):
    from trainer.smoke import main

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {named};"), err
