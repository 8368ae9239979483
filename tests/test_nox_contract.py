"""The command contract of DESIGN.md §3: session names other checks and users rely on never disappear."""

import shutil
import subprocess

import pytest

CONTRACT = {"train", "tests", "matrix", "lock", "render", "lint", "build", "equivalence", "bench", "report"}


@pytest.mark.skipif(shutil.which("nox") is None, reason="nox not on PATH")
def test_every_contract_session_exists(repo):
    out = subprocess.run(["nox", "--list"], cwd=repo, capture_output=True, text=True, check=True)
    # lines "* name -> doc" (selected by default) and "- name -> doc" (opt-in)
    sessions = {line[2:].split(" -> ")[0] for line in out.stdout.splitlines() if line[:2] in ("* ", "- ")}
    assert sessions >= CONTRACT, CONTRACT - sessions


@pytest.mark.skipif(shutil.which("nox") is None, reason="nox not on PATH")
@pytest.mark.parametrize("session", ["equivalence"])
def test_unbuilt_sessions_say_so_and_fail(repo, session):
    out = subprocess.run(["nox", "-s", session], cwd=repo, capture_output=True, text=True)
    assert out.returncode != 0
    assert "not built yet" in out.stderr + out.stdout
