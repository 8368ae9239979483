"""The code base passes its own linter configuration (pyproject.toml [tool.ruff])."""

import shutil
import subprocess

import pytest


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (the dev extra)")
def test_ruff_clean(repo):
    out = subprocess.run(["ruff", "check", "."], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
