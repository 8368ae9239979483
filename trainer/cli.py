"""`python -m trainer [RECIPE] [key=value ...]` — what `nox -s train` runs.

Bad input (recipe, override, a machine that lacks what the recipe needs, a run directory in use) is one line
and exit code 2, with nothing written; a run stopped by a non-finite loss is exit code 1 with the reason and
the checkpoint it kept; a failed rank stops every rank and is exit code 1 with the first error.
Multi-process layouts start one process per `gpus` (processes on CPU) through `trainer.parallel.launcher`: on this
host (`local`) or over a Ray cluster (`ray`), as `run.launcher` or `--launcher` says.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

from matrix import DEFAULT_MATRIX_PATH, load_matrix
from matrix.layout import ParallelLayout
from trainer.atomic import write_json
from trainer.config import TrainerInputError, parse_overrides, resolve
from trainer.console_log import console_log
from trainer.parallel.launcher import add_launcher_options, missing_package
from trainer.preflight import missing
from trainer.prepare.places import with_prepared_weights
from trainer.run_dir import LOCK, RunLock, check_same, make_dir, record_session, resume_arguments, saved_run

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Run a GRPO recipe of matrix.yaml.")
    p.add_argument("recipe", nargs="?", help="recipe name (default: demo, the embedded CPU demo; with --resume, "
                   "the run's)")
    p.add_argument("overrides", nargs="*", help="recipe overrides as key=value, e.g. run.episodes=3 grpo.lr=5e-4")
    p.add_argument("--matrix", default=str(DEFAULT_MATRIX_PATH), help="matrix file (default: matrix.yaml)")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="parent of run directories (default: runs/)")
    p.add_argument("--run-dir", help="exact run directory, new or empty (default: <runs>/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest complete checkpoint, with its recipe and "
                        "overrides (only run.episodes may be given anew)")
    p.add_argument("--rehearse", action="store_true",
                   help="run a GPU recipe on CPU: its layout's degrees with the model's tiny stand-in (see README)")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs the logging extra)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (needs WANDB_API_KEY)")
    p.add_argument("--ignore-drift", action="store_true",
                   help="inside an image: start even if its installed packages differ from its lock")
    p.add_argument("--mllog", action="store_true",
                   help="also print MLPerf-style :::MLLOG lines (copied to RUN_DIR/mllog.txt)")
    p.add_argument("--in-image", action="store_true",
                   help="run inside the recipe's built image (docker, podman or buildah; see trainer/in_image.py)")
    p.add_argument("--runtime", choices=("docker", "podman", "buildah"), help="with --in-image (default: found)")
    p.add_argument("--dry-run", action="store_true", help="with --in-image: print the container command(s) only")
    add_launcher_options(p, ranks="the ranks", default=None)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _new_run_dir(runs: Path, recipe: str) -> Path:
    """runs/<recipe>-<timestamp>[-N]: created atomically, so two runs started in one second never share one."""
    make_dir(runs, "--runs")
    stem = f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        candidate = runs / (stem if n == 0 else f"{stem}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise TrainerInputError(f"--runs {runs}: 1000 runs named {stem}* already exist")


def _holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())


def _run_dir(args) -> tuple[Path, RunLock]:
    """The run directory, locked for this run (RUN/.lock), or one line saying why not."""
    if args.resume:
        run_dir = Path(args.resume)
        return run_dir, RunLock(run_dir)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if _holds_files(run_dir):
            raise TrainerInputError(f"--run-dir {run_dir} already holds files (a run?); pick a new directory, or "
                                    f"continue that run with --resume {run_dir}")
        make_dir(run_dir, "--run-dir")
    else:
        run_dir = _new_run_dir(Path(args.runs), args.recipe)
    lock = RunLock(run_dir)
    if _holds_files(run_dir):  # another trainer got there between the check and the lock
        lock.release()
        raise TrainerInputError(f"--run-dir {run_dir} already holds files (a run?); pick a new directory")
    return run_dir, lock


def _refuse_drift(ignore: bool) -> None:
    """Inside an image built by `nox -s build`: its installed packages must still be its lock's."""
    from images.fingerprint import IMAGE_DIR, LOCK_NAME, drift

    lock = IMAGE_DIR / LOCK_NAME
    if lock.is_file() and not ignore:
        drifted = drift(lock)
        if drifted:
            raise TrainerInputError(f"this image's packages differ from its lock {lock} (--ignore-drift to start "
                                    "anyway): " + "; ".join(drifted))


def _refuse_missing_loggers(args) -> None:
    """--tensorboard / --wandb need their packages (the `logging` extra): refused before a run directory exists,
    not at the first metric of every rank."""
    for asked, flag, package in ((args.tensorboard, "--tensorboard", "tensorboard"), (args.wandb, "--wandb", "wandb")):
        if not asked:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise TrainerInputError(f"{flag}: the {package} package is not installed; install the logging extra "
                                    "(pip install -e '.[logging]'; `nox -s train` does when given this flag)") from None


def _checked_weights(resolved) -> Path | None:
    """The pretrained directory the run starts from (None: random init), refused here, before any rank starts,
    when it is missing or describes another model."""
    from trainer.models import pretrained  # imports torch: only once the cheap checks have passed

    try:
        return pretrained.check(resolved.model, resolved.recipe.model, resolved.layout, resolved.recipe.layout)
    except pretrained.WeightsError as exc:
        raise TrainerInputError(str(exc)) from None


def _check_resume(run_dir: Path, world: int) -> None:
    """Clear what an interrupted save left, skip damaged checkpoints (one line each), and refuse a checkpoint
    written by another number of ranks."""
    from trainer.checkpoint import latest_episode, ranks_in, recover

    for line in recover(run_dir):
        print(line, file=sys.stderr)
    found = latest_episode(run_dir)
    if found is None:
        print(f"--resume {run_dir}: no complete checkpoint, so the run starts again from episode 0", file=sys.stderr)
        return
    saved = ranks_in(found[1])
    if saved != world:
        raise TrainerInputError(f"--resume {run_dir}: its checkpoint holds {saved} rank(s), this layout runs {world}; "
                                f"resume with the layout and gpus the run was started with")


def _resolve(args) -> tuple:
    """The recipe (and, with --rehearse, its rehearsal) from the command line, or on --resume from the run's
    config.json plus the command line's overrides, which may change run.episodes only."""
    if args.recipe and "=" in args.recipe:  # `--resume RUN run.episodes=9`: argparse took the override for a recipe
        args.recipe, args.overrides = None, [args.recipe, *args.overrides]
    saved = saved_run(Path(args.resume)) if args.resume else None
    recipe = saved.recipe if saved else args.recipe or "demo"
    overrides = resume_arguments(Path(args.resume), saved, args.recipe, args.overrides) if saved else args.overrides
    rehearse = args.rehearse or bool(saved and saved.rehearse)
    resolved = resolve(recipe, parse_overrides(overrides), args.matrix)
    resolved = with_prepared_weights(load_matrix(args.matrix), resolved)  # what `nox -s prepare` made
    if args.dry_run and not args.in_image:
        raise TrainerInputError("--dry-run prints the container command of --in-image; add --in-image")
    if rehearse and not args.in_image:  # inside the image the same command rehearses
        from trainer.rehearse import NoStandIn, rehearsal

        try:
            resolved, substitutions = rehearsal(load_matrix(args.matrix), resolved)
        except NoStandIn as exc:
            raise TrainerInputError(f"--rehearse {recipe}: {exc}") from None
        degrees = ParallelLayout.of(resolved.layout, resolved.recipe.gpus).describe()
        print(f"rehearsal of {recipe} on CPU, layout {recipe} degrees kept ({degrees}); substitutions:")
        for line in substitutions:
            print(f"  - {line}")
    if saved and not args.in_image:
        check_same(Path(args.resume), saved, json.loads(json.dumps(resolved.model_dump(mode="json"))))
    return resolved, recipe, overrides, rehearse


def _interrupted(outcome: dict, run_dir: Path) -> int:
    episode = outcome["episode"]
    again = " ".join(["python -m trainer", "--resume", str(run_dir)])
    print(f"interrupted at episode {episode}; kept {run_dir / 'checkpoints' / f'episode-{episode:06d}'}; "
          f"resume with: {again}", file=sys.stderr)
    return 128 + outcome["signal"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may sit between overrides
    # megatron-core warns at import that TE/apex are absent: expected on CPU, and noise in every run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    lock = None
    try:
        resolved, recipe, overrides, rehearse = _resolve(args)
        args.recipe = recipe
        if args.in_image:
            from trainer.in_image import main as in_image

            return in_image(args, resolved)
        _refuse_missing_loggers(args)
        launcher = args.launcher or resolved.recipe.run.launcher
        lacking_launcher = missing_package(launcher)
        if lacking_launcher:
            raise TrainerInputError(lacking_launcher)
        lacking = missing(resolved, root=ROOT, launcher=launcher)
        _refuse_drift(args.ignore_drift)
        if lacking:
            raise TrainerInputError(f"recipe {recipe} cannot run on this machine; missing: " + "; ".join(lacking))
        # a resumed run starts from its checkpoint, whatever the model's weights say
        weights = None if args.resume else _checked_weights(resolved)
        world = resolved.recipe.gpus
        run_dir, lock = _run_dir(args)
        if args.resume:
            _check_resume(run_dir, world)
        else:
            write_json(run_dir / "config.json", {"recipe": resolved.name, "overrides": overrides,
                                                 "rehearse": rehearse, "world_size": world,
                                                 "resolved": resolved.model_dump(mode="json")})
        record_session(run_dir, ROOT, sys.argv[1:] if argv is None else argv)
    except TrainerInputError as exc:
        if lock is not None:
            lock.release()
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the ranks' handlers are in place: nothing was trained
        print("interrupted before training started; nothing to keep", file=sys.stderr)
        if lock is not None:
            lock.release()
        return 130
    try:
        with console_log(run_dir / "train.log"):
            return _train(args, resolved, run_dir, weights)
    finally:
        lock.release()


def _train(args, resolved, run_dir: Path, weights: Path | None) -> int:
    from trainer.heartbeat import stall_timeout_s, watching
    from trainer.interrupts import StoppedAtOnce
    from trainer.parallel.launcher import RankFailed, launch
    from trainer.worker import RunRequest, initial_weights, run_rank

    world = resolved.recipe.gpus
    initial = initial_weights(resolved) if world > 1 and not args.resume and weights is None else None
    restarts, resume = resolved.recipe.run.max_restarts, bool(args.resume)
    for attempt in range(restarts + 1):
        request = RunRequest(resolved, run_dir, resume=resume, tensorboard=args.tensorboard,
                             wandb_project=args.wandb, mllog=args.mllog, initial=initial, weights=weights)
        try:
            with watching(world, stall_timeout_s(resolved)):
                outcome = launch(run_rank, world, request, launcher=args.launcher or resolved.recipe.run.launcher,
                                 ray_address=args.ray_address, ranks_per_node=resolved.gpus_per_node,
                                 stall_timeout_s=stall_timeout_s(resolved))
            break
        except StoppedAtOnce as exc:  # the launcher stopped every rank first
            print(f"\n{exc}", file=sys.stderr)
            return 128 + exc.signum
        except RankFailed as exc:
            # on a line of its own: the driver's progress bar may have been cut short mid-line
            if attempt == restarts:
                print(f"\nerror: {exc}; every rank was stopped (run directory: {run_dir})", file=sys.stderr)
                return 1
            print(f"\nerror: {exc}; every rank was stopped; restart {attempt + 1} of {restarts} (run.max_restarts) "
                  "from the latest checkpoint", file=sys.stderr, flush=True)
            _check_resume(run_dir, world)  # what the failure left half-written is cleared, damage skipped
            resume = True
    if outcome["status"] == "stopped":
        print(f"error: {outcome['message']}", file=sys.stderr)
        return 1
    if outcome["status"] == "interrupted":
        return _interrupted(outcome, run_dir)
    summary = outcome["summary"]
    if "reward/first" in summary:
        print(f"reward: first episode {summary['reward/first']:.3f}, last episode {summary['reward/last']:.3f} "
              f"(first 10% mean {summary['reward/first_10pct_mean']:.3f}, last 10% mean "
              f"{summary['reward/last_10pct_mean']:.3f})")
    print(f"run directory: {run_dir}")
    return 0
