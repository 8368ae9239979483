"""The result file of one suite run: `bench/results/<id>.json`, its environment, peak and cells.

A cell is one run of one recipe on one layout (one repeat). It keeps the run's per-episode rows exactly
as `metrics.jsonl` wrote them, plus the bench's derived `bench/*` values, so every number of a report
traces back to a run directory and can be recomputed from the result alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from bench.peak import Peak
from trainer.atomic import write_bytes

SCHEMA_VERSION = 1
Row = dict[str, float | int | str | None]


class ResultError(Exception):
    """A result file that cannot be read: one line naming the file and what is wrong."""


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str
    """The suite's name for the entry (the recipe, or its `name` when run with overrides)."""
    layout: str
    image: str
    gpus: int
    repeat: int
    status: Literal["ok", "failed"]
    returncode: int | None
    seconds: float
    command: list[str]
    run_dir: str
    stderr_tail: str = ""
    peak_rss_mib: float | None = None
    """Largest resident set of the run's processes: the OS's figure when the run ended, or a larger
    `memory/peak_rss_mib` the run logged itself."""
    episodes: list[Row] = []
    load_average: tuple[float, float, float] | None = None
    """The machine's 1/5/15-minute load when the run ended: other work on the machine is noise in its numbers."""

    @property
    def key(self) -> tuple[str, str, str]:
        return self.recipe, self.layout, self.image


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str
    suite: str
    created: str
    settings: dict
    """The suite entry of the matrix as it ran (episodes, warm-up, repeats, layouts, overrides)."""
    environment: dict
    peak: Peak
    cells: list[Cell]

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.id}.json"
        write_bytes(path, (json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode())
        return path


def load_result(path: Path) -> Result:
    try:
        return Result.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file (results are written under bench/results/)") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ResultError(f"{path}: not a bench result: {where}: {first['msg']}") from None
