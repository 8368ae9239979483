"""Shared fixtures: the repository root and the committed matrix."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def matrix_text() -> str:
    return (REPO / "matrix.yaml").read_text()
