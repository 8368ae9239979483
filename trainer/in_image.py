"""`python -m trainer RECIPE --in-image`: the same entry point, run inside the recipe's image.

On the host, in seconds: the runtime (docker, podman or buildah), the image built and built from the lock here now,
enough GPUs, the weights and data there; then one container runs `python -m trainer RECIPE ...` with the recipe's
GPU count, the host's weights, data and HF cache mounted read-only at the same paths, the runs folder read-write
(written as the calling user), and the matrix file the recipe was read from. `--dry-run` prints the command(s)
and checks nothing. The container command itself is `images.runtime`'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

from images.backends import Backend
from images.common import UsageError
from images.runtime import Mount, Needs, check_built, commands, find, run, shown
from matrix import ResolvedRecipe, load_matrix
from trainer.config import TrainerInputError
from trainer.prepare.places import data_file, weights_dir

HF_CACHE_INSIDE = Path("/hf-cache")
PASSED_FLAGS = ("rehearse", "tensorboard", "mllog", "ignore_drift", "debug")


def host_gpus() -> int:
    """GPUs this host has (nvidia-smi; no torch import, so a refusal comes in seconds)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines()) if done.returncode == 0 else 0


def needs_gpus(r: ResolvedRecipe) -> int:
    return r.recipe.gpus if r.runs_on_gpus else 0


def _hf_cache() -> Path | None:
    folder = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return folder if folder.is_dir() else None


def container_needs(args: argparse.Namespace, r: ResolvedRecipe) -> Needs:
    matrix = Path(args.matrix).resolve()
    runs = Path(args.run_dir or args.resume or Path(args.runs) / "x").resolve().parent
    mounts = [Mount(matrix, matrix), Mount(runs, runs, read_only=False)]
    overrides = list(args.overrides)
    env: dict[str, str] = {}
    weights = Path(r.model.weights) if r.model.weights else None
    if weights is None and r.model.hf_id:  # where `nox -s prepare` puts them (a dry run shows it before they exist)
        weights = weights_dir(load_matrix(matrix), r)
    if weights is not None:
        weights = weights.resolve()
        mounts.append(Mount(weights, weights))
        # the tokenizer of a prepared conversion sits beside it (trainer.prepare.places.tokenizer_source)
        if (weights.parent / "hf").is_dir() and weights.name != "hf":
            mounts.append(Mount(weights.parent / "hf", weights.parent / "hf"))
        overrides.append(f"model.weights={weights}")
    data = data_file(r)
    if data is not None:
        mounts.append(Mount(data.parent.resolve(), data.parent.resolve()))
        overrides.append(f"data.path={data.resolve()}")
    cache = _hf_cache()
    if cache is not None:
        mounts.append(Mount(cache.resolve(), HF_CACHE_INSIDE))
        env["HF_HOME"] = str(HF_CACHE_INSIDE)
    command = ["python", "-m", "trainer", r.name, *overrides, "--matrix", str(matrix), "--runs", str(runs)]
    if args.run_dir:
        command += ["--run-dir", str(Path(args.run_dir).resolve())]
    if args.resume:
        command += ["--resume", str(Path(args.resume).resolve())]
    if args.wandb:
        command += ["--wandb", args.wandb]
    command += [f"--{f.replace('_', '-')}" for f in PASSED_FLAGS if getattr(args, f)]
    return Needs(image=r.recipe.image, command=command, gpus=needs_gpus(r), mounts=mounts, env=env)


def _check_host(r: ResolvedRecipe) -> None:
    """What the container cannot fix: GPUs, weights, data (the image is checked by the runtime)."""
    need, have = needs_gpus(r), host_gpus()
    if need > have:
        raise TrainerInputError(f"recipe {r.name} needs {need} GPUs (layout {r.recipe.layout}), this machine has "
                                f"{have}")
    if r.model.hf_id and not r.model.weights:
        raise TrainerInputError(f"weights of {r.model.hf_id} are not prepared; run `nox -s prepare -- {r.name}`")
    if r.model.weights and not Path(r.model.weights).exists():
        raise TrainerInputError(f"model.weights {r.model.weights}: not there; run `nox -s prepare -- {r.name}`")
    data = data_file(r)
    if data is not None and not data.is_file():
        raise TrainerInputError(f"data file {data}: not there; run `nox -s prepare -- {r.name}`")


def main(args: argparse.Namespace, r: ResolvedRecipe) -> int:
    environ = dict(os.environ)
    try:
        if args.dry_run:  # what would run, on any machine: nothing is checked
            backend = Backend(args.runtime, None if args.runtime == "docker" else "vfs") if args.runtime else find(None)
            for argv in commands(backend, container_needs(args, r), environ):
                print(shown(argv, environ))
            return 0
        _check_host(r)
        backend = find(args.runtime)
        check_built(backend, r.recipe.image)
        Path(container_needs(args, r).mounts[1].host).mkdir(parents=True, exist_ok=True)  # the caller's folder
        return run(backend, container_needs(args, r), environ)
    except UsageError as exc:
        raise TrainerInputError(str(exc)) from None
