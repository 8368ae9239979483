"""`python -m trainer [RECIPE] [key=value ...]` — what `nox -s train` runs.

Bad input (recipe, override, a machine that lacks what the recipe needs) is one line and exit code 2;
a run stopped by a non-finite loss is exit code 1 with the reason and the checkpoint it kept.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from matrix import DEFAULT_MATRIX_PATH
from trainer.config import TrainerInputError, parse_overrides, resolve
from trainer.preflight import missing

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Run a GRPO recipe of matrix.yaml.")
    p.add_argument("recipe", nargs="?", default="demo", help="recipe name (default: demo, the embedded CPU demo)")
    p.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. run.episodes=3 grpo.lr=5e-4")
    p.add_argument("--matrix", default=str(DEFAULT_MATRIX_PATH), help="matrix file (default: matrix.yaml)")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="parent of run directories (default: runs/)")
    p.add_argument("--run-dir", help="exact run directory (default: <runs>/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs the logging extra)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (needs WANDB_API_KEY)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        resolved = resolve(args.recipe, parse_overrides(args.overrides), args.matrix)
        lacking = missing(resolved, root=ROOT)
        if lacking:
            raise TrainerInputError(f"recipe {args.recipe} cannot run on this machine; missing: " + "; ".join(lacking))
    except TrainerInputError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from trainer.atomic import write_json
    # megatron-core warns at import that TE/apex are absent: expected on CPU, and noise in every run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    from trainer.loop import RunStopped, train  # heavy imports only once the input is known good
    from trainer.metrics import MetricsLog

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoints" / "latest").exists():
            print(f"error: --resume {run_dir}: no checkpoint there (expected {run_dir}/checkpoints/latest)",
                  file=sys.stderr)
            return 2
    else:
        run_dir = Path(args.run_dir or Path(args.runs) / f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {"recipe": resolved.name, "overrides": args.overrides,
                                             "resolved": resolved.model_dump(mode="json")})
    log = MetricsLog(run_dir, tensorboard=args.tensorboard, wandb_project=args.wandb,
                     config=resolved.model_dump(mode="json"))
    try:
        summary = train(resolved, run_dir, log=log, resume=bool(args.resume))
    except RunStopped as exc:
        log.write_summary({"recipe": resolved.name, "run_dir": str(run_dir), "status": f"stopped: {exc}"})
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        log.close()
    if "reward/first" in summary:
        print(f"reward: first episode {summary['reward/first']:.3f}, last episode {summary['reward/last']:.3f} "
              f"(first 10% mean {summary['reward/first_10pct_mean']:.3f}, last 10% mean "
              f"{summary['reward/last_10pct_mean']:.3f})")
    print(f"run directory: {run_dir}")
    return 0
