"""`python -m trainer.equivalence [GATE ...]` (what `nox -s equivalence` runs): every gate of the matrix.

For each gate: prepare one rollout of its recipe (cached by recipe and code), replay it with the reference layout
and each candidate layout on every run (every layout a real multi-process launch, never a cached record), compare,
and write ``runs/gates/<gate>/verdict.json`` and ``verdict.md``; print the table. Exit 1 when a gate fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from matrix import DEFAULT_MATRIX_PATH, Matrix, MatrixError, ResolvedRecipe, load_matrix
from matrix.layout import ParallelLayout
from matrix.schema import Gate, LayoutPatch
from trainer.atomic import write_bytes, write_json
from trainer.config import TrainerInputError
from trainer.equivalence.compare import compare
from trainer.parallel.launcher import add_launcher_options, missing_package

ROOT = Path(__file__).resolve().parent.parent.parent


class GateInputError(Exception):
    """Bad gate input (unknown gate, unreadable matrix): one line, exit 2."""


def variant(m: Matrix, recipe_name: str, patch: LayoutPatch) -> ResolvedRecipe:
    """The recipe with ``patch``'s degrees, GPU count and trainer."""
    base = m.resolve(recipe_name)
    recipe, layout = patch.applied_to(base.recipe, base.layout)
    dims = ParallelLayout.of(layout, recipe.gpus)
    return base.model_copy(update={"layout": layout, "recipe": recipe, "min_gpus": dims.min_world, "dp": dims.dp})


def describe(patch: LayoutPatch) -> str:
    shown = " ".join(f"{k}={v}" for k, v in patch.model_dump(exclude_none=True).items())
    return shown or "one process"


SOURCES = ("trainer", "matrix")  # the code whose output the cache holds


@functools.cache
def code_fingerprint() -> str:
    """The trainer's source and the libraries that compute with it: a cached record made by other code is stale
    (a rollout prepared by yesterday's trainer would not be today's warm start, and a batch of an older format
    would not load)."""
    digest = hashlib.sha256()
    for package in ("torch", "megatron-core", "transformers"):
        digest.update(f"{package}=={importlib.metadata.version(package)}".encode())
    for source in sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py")):
        digest.update(str(source.relative_to(ROOT)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


CACHE_ENV = "GRPO_STACK_GATES_CACHE"


def cache_dir(out: Path) -> Path:
    """Where prepared rollouts are kept: ``$GRPO_STACK_GATES_CACHE`` (CI: beside its wheel caches, so that a rerun
    on the same code reuses them), else OUT/.cache."""
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else out / ".cache"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs layouts of gates. Only the prepared rollout (warm start + one collected episode, the slow part that no
    layout under test takes part in) is cached on disk, by content and by `code_fingerprint`; entries made by other
    code are deleted when a runner starts. The reference and every candidate are replayed on every run: a record
    kept from an earlier run would hide whatever the fingerprint cannot see (a driver, NCCL, an environment
    variable, a patched collective, another machine) and print yesterday's verdict."""

    def __init__(self, m: Matrix, cache: Path, plant: str | None = None, launcher: str | None = None,
                 ray_address: str | None = None):
        self.m, self.cache, self.plant = m, cache, plant
        self.launcher, self.ray_address = launcher, ray_address  # launcher None: each recipe's run.launcher
        self.references: dict[str, dict] = {}  # in memory, this run only: gates of one recipe share a reference
        cache.mkdir(parents=True, exist_ok=True)
        self.code = code_fingerprint()
        for stale in cache.glob("*.pt"):
            if not stale.name.startswith(f"{self.code}-"):
                stale.unlink(missing_ok=True)

    def _cached(self, key: str, make):
        path = self.cache / f"{self.code}-{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        value = make()
        tmp = path.with_suffix(".partial")
        torch.save(value, tmp)
        tmp.rename(path)
        return value

    def inputs(self, recipe: str) -> tuple[dict, dict]:
        from trainer.equivalence.replay import prepare

        base = self.m.resolve(recipe)
        return self._cached(f"inputs-{_key(base.model_dump(mode='json'))}", lambda: prepare(base, ROOT))

    def replay(self, resolved: ResolvedRecipe, steps: int, *, candidate: bool) -> dict:
        from trainer.equivalence.replay import Replay, replay_rank
        from trainer.parallel.launcher import launch
        from trainer.parallel.rank import FAULT_ENV

        initial, batch = self.inputs(resolved.name)
        job = Replay(resolved, initial, batch, steps)
        run = functools.partial(launch, replay_rank, resolved.recipe.gpus, job,
                                launcher=self.launcher or resolved.recipe.run.launcher, ray_address=self.ray_address,
                                ranks_per_node=resolved.gpus_per_node)
        if not candidate:
            key = _key(resolved.model_dump(mode="json"), steps)
            if key not in self.references:
                self.references[key] = run()
            return self.references[key]
        if not self.plant:
            return run()
        os.environ[FAULT_ENV] = self.plant  # passed on to the candidate's ranks only
        try:
            return run()
        finally:
            del os.environ[FAULT_ENV]


def run_gate(runner: Runner, name: str, gate: Gate, out: Path, console: Console,
             only: list[int] | None = None) -> bool:
    """Replay the reference and the candidates (``only``: these 0-based indices) and write the verdict."""
    started = time.perf_counter()
    m = runner.m
    _, batch = runner.inputs(gate.recipe)
    reference = runner.replay(variant(m, gate.recipe, gate.reference), gate.steps, candidate=False)
    rows = []
    for patch in gate.candidates if only is None else [gate.candidates[i] for i in only]:
        resolved = variant(m, gate.recipe, patch)
        record = runner.replay(resolved, gate.steps, candidate=True)
        measured = compare(reference, record, batch["response_mask"], gate.tolerances, cp=resolved.layout.cp,
                           quantities=gate.compare)
        rows += [(describe(patch), x) for x in measured]
    passed = all(x.passed for _, x in rows)
    verdict = {"gate": name, "recipe": gate.recipe, "reference": describe(gate.reference), "steps": gate.steps,
               "passed": passed, "seconds": round(time.perf_counter() - started, 1),
               "rows": [{"candidate": c, "quantity": x.quantity, "measured": x.value, "tolerance": x.tolerance,
                         "passed": x.passed} for c, x in rows]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "verdict.json", verdict)
    lines = [f"# Gate {name}: {'PASS' if passed else 'FAIL'}", "",
             f"recipe `{gate.recipe}`, reference: {describe(gate.reference)}, {gate.steps} training steps on one "
             f"saved rollout", "", "| candidate | quantity | measured | tolerance | result |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {x.quantity} | {x.value:.3g} | {x.tolerance:.3g} | {'pass' if x.passed else 'FAIL'} |"
              for c, x in rows]
    write_bytes(out / "verdict.md", ("\n".join(lines) + "\n").encode())
    table = Table(title=f"gate {name} ({gate.recipe}, reference: {describe(gate.reference)}): "
                        f"{'PASS' if passed else 'FAIL'}")
    for column in ("candidate", "quantity", "measured", "tolerance", "result"):
        table.add_column(column)
    for c, x in rows:
        table.add_row(c, x.quantity, f"{x.value:.3g}", f"{x.tolerance:.3g}",
                      "pass" if x.passed else "[bold red]FAIL[/]")
    console.print(table)
    return passed


def _in_image(m: Matrix, args: argparse.Namespace) -> int:
    """The same gates, inside their recipes' image (one container per image)."""
    from trainer.in_image import Entry, by_image, launcher_arguments, run_entries

    names = args.gates or list(m.gates)
    recipes = {n: [variant(m, m.gates[n].recipe, p) for p in (m.gates[n].reference, *m.gates[n].candidates)]
               for n in names}
    matrix, out = Path(args.matrix).resolve(), Path(args.out).resolve()
    writes = [out] + ([Path(args.cache).resolve()] if args.cache else [])
    common = ["--matrix", str(matrix), "--out", str(out)] + (["--cache", str(writes[1])] if args.cache else [])
    common += [f"--candidate={i}" for i in args.candidate or []]
    common += launcher_arguments(args)
    entries = [Entry(image, ["python", "-m", "trainer.equivalence", *group, *common],
                     [r for n in group for r in recipes[n]], writes, launcher=args.launcher)
               for image, group in by_image("gate", recipes).items()]
    return run_entries(entries, matrix, runtime=args.runtime, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.equivalence", description="Run layout-equivalence gates.")
    p.add_argument("gates", nargs="*", help="gate names (default: every gate of the matrix)")
    p.add_argument("--matrix", default=str(DEFAULT_MATRIX_PATH))
    p.add_argument("--out", default=str(ROOT / "runs" / "gates"), help="verdicts go to OUT/<gate>/")
    p.add_argument("--cache", help=f"where prepared rollouts are kept (default: ${CACHE_ENV}, else OUT/.cache)")
    p.add_argument("--candidate", type=int, action="append", metavar="N",
                   help="run only candidate N (0-based, repeatable) of each named gate; default: all")
    p.add_argument("--plant", metavar="FILE:FUNCTION", help=argparse.SUPPRESS)  # tests: a fault in the candidates
    p.add_argument("--in-image", action="store_true", help="run inside the gates' built image (trainer/in_image.py)")
    p.add_argument("--runtime", choices=("docker", "podman", "buildah"), help="with --in-image (default: found)")
    p.add_argument("--dry-run", action="store_true", help="with --in-image: print the container command(s) only")
    add_launcher_options(p, ranks="each layout's ranks", default=None)
    args = p.parse_args(argv)
    console = Console()
    try:
        try:
            m = load_matrix(args.matrix)
        except MatrixError as exc:
            raise GateInputError(str(exc)) from None
        unknown = [g for g in args.gates if g not in m.gates]
        if unknown:
            raise GateInputError(f"unknown gate {unknown[0]!r}; gates: {', '.join(m.gates) or '(none)'}")
        lacking = missing_package(args.launcher) if args.launcher else None
        if lacking:
            raise GateInputError(lacking)
        for name in args.gates or list(m.gates):
            count = len(m.gates[name].candidates)
            wrong = [i for i in args.candidate or [] if not 0 <= i < count]
            if wrong:
                raise GateInputError(f"--candidate {wrong[0]}: gate {name} has candidates 0..{count - 1}")
        if args.dry_run and not args.in_image:
            raise GateInputError("--dry-run prints the container command of --in-image; add --in-image")
        if args.in_image:
            return _in_image(m, args)
    except (GateInputError, TrainerInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    from trainer.parallel.launcher import RankFailed

    out = Path(args.out)
    runner = Runner(m, Path(args.cache) if args.cache else cache_dir(out), plant=args.plant, launcher=args.launcher,
                    ray_address=args.ray_address)
    failed = []
    for name in args.gates or list(m.gates):
        console.print(f"[bold]gate {name}[/]: {len(m.gates[name].candidates)} candidate(s) against "
                      f"{describe(m.gates[name].reference)}")
        try:
            if not run_gate(runner, name, m.gates[name], out / name, console, only=args.candidate):
                failed.append(name)
        except RankFailed as exc:
            print(f"error: gate {name}: {exc}", file=sys.stderr)
            failed.append(name)
    console.print(f"{len(failed)} of {len(args.gates or m.gates)} gate(s) failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
