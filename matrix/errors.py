"""Problems found in a matrix file: one line each, naming file, line, YAML path, value and the fix."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn


def exit_with(main: Callable[[], int]) -> NoReturn:
    """``sys.exit(main())`` for a command's ``__main__``; output to a pipe whose reader stopped early
    (``nox -s matrix -- --json | head``) ends the command without a traceback, exit 1 (as Python's documentation
    advises and as rich does for its own output)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit, which would fail again: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of `choices` to a misspelt `name`, else ""."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


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
