"""Run a `prepare` plan: skip what the manifest says is done, check the disk, run the rest in order.

``python -m trainer.prepare RECIPE [--from DIR ...] [--dry-run] [--launcher local|ray]`` (``nox -s prepare -- ...``).
A step is done when the manifest's hashes of its inputs and outputs are those on disk now, so a rerun skips
everything, and a changed input redoes exactly the steps that read it (and those downstream whose input then
changed). Bad input or an unmet need is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from matrix import DEFAULT_MATRIX_PATH, Matrix, MatrixError, ResolvedRecipe, load_matrix
from trainer.parallel.launcher import Placement, add_launcher_options, missing_package
from trainer.prepare import PrepareError
from trainer.prepare.manifest import Manifest, size
from trainer.prepare.places import prepared_root
from trainer.prepare.steps import Step, clear, plan, prepared_root_of

STARTED = ".prepare-inputs.json"  # inside a resumable step's output: the input hashes its partial work is from


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(prepared_root_of(path)).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _state(manifest: Manifest, step: Step) -> str | None:
    """None when done; else why it runs."""
    entry = manifest.steps.get(step.id)
    if entry is None:
        return "not run yet"
    now = manifest.hashes(step.inputs)
    if entry["inputs"] != now:
        changed = [p for p, h in now.items() if entry["inputs"].get(p) != h]
        return f"input changed: {changed[0]}"
    if entry["outputs"] != manifest.hashes(step.outputs):
        return "output changed or missing"
    return None


def _start(manifest: Manifest, step: Step) -> None:
    """Clear what an unfinished try left, keeping a resumable step's partial output if it is from these inputs."""
    manifest.forget(step.id)
    inputs = manifest.hashes(step.inputs)
    marker = step.outputs[0] / STARTED
    if step.resumable and marker.is_file() and json.loads(marker.read_text()) == inputs:
        from trainer.models.weight_files import HF_INDEX

        (step.outputs[0] / HF_INDEX).unlink(missing_ok=True)  # complete-looking but unrecorded: written again
        return
    clear(step)
    if step.resumable:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(inputs))


def run_plan(matrix: Matrix, steps: list[Step], *, dry_run: bool, out=print) -> list[str]:
    """Execute (or, dry, show) ``steps``; returns the ids of the steps run (or that would run)."""
    manifest = Manifest(prepared_root(matrix))
    ran: list[str] = []
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.id}: {step.title}"
        upstream = [s.id for s in steps[: i - 1] if s.id in ran and set(map(str, s.outputs)) & set(map(str, step.inputs))]
        why = f"its input comes from {upstream[0]}, which runs first" if dry_run and upstream else _state(manifest, step)
        if why is None:
            out(f"{head} — done, skipped")
            continue
        ran.append(step.id)
        if dry_run:
            out(f"{head} — would run ({why})")
            continue
        need, free = step.estimate(), free_bytes(step.outputs[0])
        if need > free:
            raise PrepareError(f"step {step.id}: needs about {_gb(need)} in {prepared_root_of(step.outputs[0])}, "
                               f"{_gb(free)} free; free some space (or move `prepared:` in matrix.yaml)")
        out(f"{head} — running ({why}); reads {_gb(size(step.inputs))}, writes about {_gb(need)} "
            f"({_gb(free)} free)")
        _start(manifest, step)
        started = time.monotonic()
        step.action()
        if step.outputs[0].is_dir():
            (step.outputs[0] / STARTED).unlink(missing_ok=True)
        manifest.record(step.id, step.inputs, step.outputs)
        out(f"    done in {time.monotonic() - started:.1f} s: {_gb(size(step.outputs))} → {step.outputs[0]}")
    return ran


def conversion_placement(args: argparse.Namespace, resolved: ResolvedRecipe) -> Placement:
    """Where a sharded conversion's ranks run: as the recipe's training would (``--launcher``, else its
    ``run.launcher``; its nodes' worth of ranks to a node)."""
    launcher = args.launcher or resolved.recipe.run.launcher
    lacking = missing_package(launcher)
    if lacking:
        raise PrepareError(lacking)
    return Placement(launcher, args.ray_address, resolved.gpus_per_node)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--from", dest="froms", action="append", default=[], type=Path, metavar="DIR",
                   help="weights (config.json + safetensors) or data (*.parquet) already on disk; no download")
    p.add_argument("--dry-run", action="store_true", help="show the plan (done / would run, and why); run nothing")
    p.add_argument("--matrix", default=str(DEFAULT_MATRIX_PATH), help="matrix file (default: matrix.yaml)")
    add_launcher_options(p, ranks="a sharded conversion's ranks", default=None)
    args = p.parse_args(argv)
    try:
        try:
            matrix = load_matrix(Path(args.matrix))
        except MatrixError as exc:
            raise PrepareError(str(exc)) from None
        if args.recipe not in matrix.recipes:
            raise PrepareError(f"unknown recipe {args.recipe!r}; recipes: {', '.join(matrix.recipes)}")
        resolved = matrix.resolve(args.recipe)
        steps = plan(matrix, resolved, args.froms, conversion_placement(args, resolved))
        if not steps:
            print(f"recipe {args.recipe} needs nothing prepared (random initialisation, the embedded demo data)")
            return 0
        ran = run_plan(matrix, steps, dry_run=args.dry_run)
    except Exception as exc:  # noqa: BLE001 - bad input from any layer below becomes one line
        from trainer.data.math_lighteval import MathDataError
        from trainer.models.weight_files import WeightsError  # the converter's ConvertError too

        if not isinstance(exc, PrepareError | WeightsError | MathDataError):
            raise
        print(f"error: prepare {args.recipe}: {exc}", file=sys.stderr)
        return 2
    verb = "would run" if args.dry_run else "ran"
    print(f"prepare {args.recipe}: {verb} {len(ran)} of {len(steps)} steps; `nox -s train -- {args.recipe}` finds "
          "them without flags")
    return 0
