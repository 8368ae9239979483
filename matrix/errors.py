"""Problems found in a matrix file: one line each, naming file, line, YAML path, value and the fix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One problem at one place. `line` is 1-based; `path` is the dotted YAML path ("" for the root)."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = self.path or "(top level)"
        return f"{self.file}:{self.line} {where}: {self.message}"


class MatrixError(Exception):
    """Every problem of one file, reported together (never just the first)."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems))
        super().__init__("\n".join(str(p) for p in self.problems))
