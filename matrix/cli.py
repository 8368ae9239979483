"""`nox -s matrix`: validate a matrix file, then show it as a table or as resolved JSON."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from matrix.errors import MatrixError
from matrix.load import DEFAULT_MATRIX_PATH, load_matrix
from matrix.schema import Matrix


def resolved_json(m: Matrix) -> dict:
    """The whole matrix, with each recipe's derived `min_gpus` and `dp` added."""
    out = m.model_dump(mode="json")
    for name in m.recipes:
        r = m.resolve(name)
        out["recipes"][name] |= {"min_gpus": r.min_gpus, "dp": r.dp}
    return out


def recipe_status(m: Matrix, name: str) -> str:
    """What the README's status box says of a recipe: CPU-image recipes run here; GPU-image ones never ran."""
    return "runs here" if m.images[m.recipes[name].image].engine is None else "(GPU) not verified here"


def table(m: Matrix) -> Table:
    t = Table(title=f"{len(m.recipes)} recipes", show_lines=False)
    for column in ("recipe", "model", "image", "trainer", "rollout", "layout", "GPUs", "min GPUs", "DP", "status"):
        t.add_column(column, justify="right" if "GPU" in column or column == "DP" else "left")
    for name in m.recipes:
        r = m.resolve(name)
        lay = r.layout
        degrees = ("fsdp" + (f" Ulysses{lay.ulysses}" if lay.ulysses > 1 else "")) if lay.fsdp else " ".join(
            f"{k.upper()}{v}" for k, v in (("tp", lay.tp), ("pp", lay.pp), ("cp", lay.cp), ("ep", lay.ep),
                                           ("etp", lay.etp or 1)) if v > 1) or "-"
        t.add_row(name, r.recipe.model, r.recipe.image, r.recipe.trainer, r.recipe.rollout.engine,
                  f"{r.recipe.layout} ({degrees})", str(r.recipe.gpus), str(r.min_gpus), str(r.dp),
                  recipe_status(m, name))
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s matrix --", description=__doc__)
    parser.add_argument("--file", default=str(DEFAULT_MATRIX_PATH), help="matrix file to validate (default: matrix.yaml)")
    parser.add_argument("--json", action="store_true", help="print the resolved matrix as JSON")
    args = parser.parse_args(argv)
    try:
        m = load_matrix(args.file)
    except MatrixError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.json:
        json.dump(resolved_json(m), sys.stdout, indent=2)
        print()
    else:
        Console(width=190).print(table(m))
        print(f"{args.file}: valid ({len(m.images)} images, {len(m.models)} models, {len(m.layouts)} layouts, "
              f"{len(m.recipes)} recipes, {len(m.gates)} gates, {len(m.benchmarks)} benchmarks)")
    return 0
