"""Fixtures of the images tests: the CLI run in-process, and a temporary copy of matrix.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from images.cli import main
from images.common import MATRIX_ENV, REPO_ROOT

DATA = Path(__file__).parent / "data"


@pytest.fixture
def cli(capsys):
    """Run `python -m images ARGS` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def matrix_copy(tmp_path, monkeypatch):
    """A temporary copy of matrix.yaml, selected through $GRPO_MATRIX; edit it with `.replace(old, new)`."""

    class Copy:
        path = tmp_path / "matrix.yaml"

        def replace(self, old: str, new: str) -> None:
            text = self.path.read_text()
            assert text.count(old) == 1, f"{old!r} must occur once in matrix.yaml"
            self.path.write_text(text.replace(old, new))

    Copy.path.write_text((REPO_ROOT / "matrix.yaml").read_text())
    monkeypatch.setenv(MATRIX_ENV, str(Copy.path))
    return Copy()
