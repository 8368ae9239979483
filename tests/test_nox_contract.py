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
