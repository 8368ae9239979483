"""`python -m bench run [SUITE ...]` and `python -m bench report [RESULT ...]` — what `nox -s bench` / `report` run.

Bad input (unknown suite, a cell the trainer would refuse, an unreadable result) is one line and exit 2.
`report --fail-on-regression` exits 1 when a candidate has a flagged regression (for CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matrix import DEFAULT_MATRIX_PATH, MatrixError
from trainer.config import TrainerInputError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _here(text: str) -> Path:
    """A path argument resolved against the working directory: the trainer runs started from here run in ROOT."""
    return Path(text).absolute()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark suites of matrix.yaml and reports.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run suites; one result JSON per suite")
    run.add_argument("suites", nargs="*", default=["cpu"], help="suite names of the matrix (default: cpu)")
    run.add_argument("--matrix", type=_here, default=DEFAULT_MATRIX_PATH, help="matrix file (default: matrix.yaml)")
    run.add_argument("--results", type=_here, default=RESULTS, help="where results go (default: bench/results/)")
    run.add_argument("--runs", type=_here, default=ROOT / "runs" / "bench", help="parent of the run directories")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take before it is killed")
    run.add_argument("--in-image", action="store_true", help="run inside the suites' built image (trainer/in_image.py)")
    run.add_argument("--runtime", choices=("docker", "podman", "buildah"), help="with --in-image (default: found)")
    run.add_argument("--dry-run", action="store_true", help="with --in-image: print the container command(s) only")
    rep = sub.add_parser("report", help="compare results (baseline = first); default: the two newest results of "
                                        "the suite run last, by the time recorded in each")
    rep.add_argument("results", nargs="*", type=Path, help="result JSON files, baseline first")
    rep.add_argument("--threshold", type=float, default=0.10, help="relative change flagged (default 0.10 = 10%%)")
    rep.add_argument("--out", type=Path, help="report directory (default: reports/<baseline id>[--<last candidate id>])")
    rep.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged")
    return p


def _newest_pair(directory: Path) -> list:
    """The two newest results of one suite by the time recorded inside each (file times are checkout order on a
    fresh clone): of the suite run most recently among those with two results or more."""
    from datetime import datetime

    from bench.result import load_result

    by_suite: dict[str, list] = {}
    for path in directory.glob("*.json"):
        result = load_result(path)
        by_suite.setdefault(result.suite, []).append((datetime.fromisoformat(result.created), result))
    pairs = [sorted(found, key=lambda x: x[0])[-2:] for found in by_suite.values() if len(found) >= 2]
    if not pairs:
        raise FileNotFoundError(f"no suite with two results in {directory}; run `nox -s bench` twice or name "
                                "result files (baseline first)")
    (base_time, base), (cand_time, cand) = max(pairs, key=lambda pair: pair[-1][0])
    print(f"comparing the two newest results of suite {base.suite} by their recorded time: baseline {base.id} "
          f"({base_time.isoformat()}), candidate {cand.id} ({cand_time.isoformat()})")
    return [base, cand]


def _in_image(args: argparse.Namespace) -> int:
    """The same suites, inside their recipes' image (one container per image), writing results and runs here."""
    from bench.suite import SuiteError, plan
    from matrix import load_matrix
    from trainer.config import parse_overrides, resolve
    from trainer.in_image import Entry, by_image, run_entries

    if not args.in_image:
        raise SuiteError("--dry-run prints the container command of --in-image; add --in-image")
    m = load_matrix(args.matrix)
    unknown = [s for s in args.suites if s not in m.benchmarks]
    if unknown:
        raise SuiteError(f"unknown suite '{unknown[0]}'; suites in {args.matrix}: {', '.join(m.benchmarks) or '(none)'}")
    recipes = {s: [resolve(p.recipe, parse_overrides(list(p.overrides)), args.matrix)
                   for p in plan(m, m.benchmarks[s], args.matrix)] for s in args.suites}
    common = ["--matrix", str(args.matrix), "--results", str(args.results), "--runs", str(args.runs),
              "--timeout", f"{args.timeout:g}"]
    entries = [Entry(image, ["python", "-m", "bench", "run", *group, *common],
                     [r for s in group for r in recipes[s]], [args.results, args.runs])
               for image, group in by_image("suite", recipes).items()]
    return run_entries(entries, args.matrix, runtime=args.runtime, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bench.result import ResultError, load_result
    from bench.suite import SuiteError

    try:
        if args.command == "run" and (args.in_image or args.dry_run):
            return _in_image(args)
        if args.command == "run":
            from bench.suite import run_suite

            for suite in args.suites:
                path = run_suite(suite, root=ROOT, matrix_path=args.matrix, results_dir=args.results,
                                 runs_dir=args.runs, timeout=args.timeout)
                print(f"result: {path}")
            return 0
        if not 0 < args.threshold < 1:
            raise ValueError(f"--threshold {args.threshold}: expected a fraction in (0, 1), e.g. 0.1 for 10%")
        results = [load_result(p) for p in args.results] if args.results else _newest_pair(RESULTS)
    except (SuiteError, ResultError, MatrixError, TrainerInputError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from bench.report import write_report

    ids = [results[0].id] if len(results) == 1 else [results[0].id, results[-1].id]
    out = args.out or ROOT / "reports" / "--".join(ids)
    flags = write_report(results, out, threshold=args.threshold)
    for candidate, rows in flags.items():
        shown = ", ".join("/".join(r) for r in rows) or "none"
        print(f"{candidate}: {len(rows)} regression(s) against {results[0].id}: {shown}")
    print(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return 1 if args.fail_on_regression and any(flags.values()) else 0
