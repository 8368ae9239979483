"""`--in-image` of `python -m trainer`, `trainer.equivalence` and `bench run`: the same entry point, inside the image.

On the host, in seconds: the runtime (docker, podman or buildah), the image built and built from the lock here now,
enough GPUs, the weights and data there; then one container runs `python -m trainer RECIPE ...` with the recipe's
GPU count, the host's weights, data and HF cache mounted read-only at the same paths, the runs folder read-write
(written as the calling user), and the matrix file the recipe was read from. `--dry-run` prints the command(s)
and checks nothing. The container command itself is `images.runtime`'s.

Each entry point says what it runs as an ``Entry`` (image, command, recipes, folders it writes); `run_entries`
does the rest the same way for all three. Gates and suites run whole inside one image each (grouped by image);
their recipes' prepared weights or data are refused there, since only the train command takes them as overrides.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from images.backends import Backend
from images.common import UsageError
from images.runtime import Mount, Needs, check_built, commands, find, run, shown
from matrix import ResolvedRecipe, load_matrix
from trainer.config import TrainerInputError
from trainer.gpus import host_gpus
from trainer.prepare.places import data_file, weights_dir

HF_CACHE_INSIDE = Path("/hf-cache")
PASSED_FLAGS = ("rehearse", "tensorboard", "mllog", "ignore_drift", "debug")


def needs_gpus(r: ResolvedRecipe) -> int:
    return r.recipe.gpus if r.runs_on_gpus else 0


def _hf_cache() -> Path | None:
    folder = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return folder if folder.is_dir() else None


def _hf_cache_mount() -> tuple[list[Mount], dict[str, str]]:
    cache = _hf_cache()
    if cache is None:
        return [], {}
    return [Mount(cache.resolve(), HF_CACHE_INSIDE)], {"HF_HOME": str(HF_CACHE_INSIDE)}


def recipe_inputs(matrix: Path, r: ResolvedRecipe) -> tuple[list[Mount], list[str]]:
    """The read-only mounts of ``r``'s weights and data (at their host paths) and the overrides that point the
    run at them there."""
    mounts, overrides = [], []
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
    return mounts, overrides


@dataclass
class Entry:
    """One entry point run inside one image: the recipes it runs (checked on the host for GPUs, weights and
    data; the container gets the most GPUs one of them needs), the folders it writes (mounted read-write,
    created first by the caller, so they are the caller's) and the rest of its mounts and environment."""

    image: str
    command: list[str]
    recipes: list[ResolvedRecipe]
    writes: list[Path]
    mounts: list[Mount] = field(default_factory=list)
    launcher: str | None = None
    """``--launcher`` as given (None: each recipe's ``run.launcher``)."""

    @property
    def ranks_here(self) -> bool:
        """Whether the recipes' ranks run in this container; not for a Ray driver, whose ranks run on the
        cluster's nodes: the container then needs no GPUs, and the host's are not counted."""
        return all((self.launcher or r.recipe.run.launcher) == "local" for r in self.recipes)

    def needs(self, matrix: Path) -> Needs:
        cache, env = _hf_cache_mount()
        mounts = [Mount(matrix, matrix), *(Mount(w, w, read_only=False) for w in self.writes), *self.mounts]
        for r in self.recipes:  # a folder the matrix names itself is read there at the same (absolute) path
            weights = Path(r.model.weights) if r.model.weights and Path(r.model.weights).is_absolute() else None
            if weights is not None and all(m.host != weights for m in mounts):
                mounts.append(Mount(weights, weights))
        mounts += cache
        gpus = max(map(needs_gpus, self.recipes), default=0) if self.ranks_here else 0
        return Needs(image=self.image, command=self.command, gpus=gpus, mounts=mounts, env=env)


def train_entry(args: argparse.Namespace, r: ResolvedRecipe) -> Entry:
    """`python -m trainer RECIPE ...` with the recipe's weights and data mounted and pointed at."""
    matrix = Path(args.matrix).resolve()
    runs = Path(args.run_dir or args.resume or Path(args.runs) / "x").resolve().parent
    mounts, overrides = recipe_inputs(matrix, r)
    command = ["python", "-m", "trainer", r.name, *args.overrides, *overrides, "--matrix", str(matrix),
               "--runs", str(runs)]
    if args.run_dir:
        command += ["--run-dir", str(Path(args.run_dir).resolve())]
    if args.resume:
        command += ["--resume", str(Path(args.resume).resolve())]
    if args.wandb:
        command += ["--wandb", args.wandb]
    command += launcher_arguments(args)
    command += [f"--{f.replace('_', '-')}" for f in PASSED_FLAGS if getattr(args, f)]
    return Entry(r.recipe.image, command, [r], [runs], mounts, launcher=args.launcher)


def launcher_arguments(args: argparse.Namespace) -> list[str]:
    """``--launcher`` / ``--ray-address`` as given on the host, for the same command inside the image."""
    return (["--launcher", args.launcher] if args.launcher else []) + (
        ["--ray-address", args.ray_address] if args.ray_address else [])


def container_needs(args: argparse.Namespace, r: ResolvedRecipe) -> Needs:
    return train_entry(args, r).needs(Path(args.matrix).resolve())


def by_image(what: str, recipes: dict[str, list[ResolvedRecipe]]) -> dict[str, list[str]]:
    """image → the names (gates, suites) whose recipes run in it, in order; a name whose recipes need prepared
    weights or data, which reach a container only as a train command's overrides, is refused."""
    groups: dict[str, list[str]] = {}
    for name, rs in recipes.items():
        images = sorted({r.recipe.image for r in rs})
        if len(images) > 1:
            raise TrainerInputError(f"--in-image: {what} {name} runs recipes of images {', '.join(images)}; run "
                                    f"one image at a time")
        prepared = next((r for r in rs if r.model.hf_id and not r.model.weights or data_file(r)), None)
        if prepared is not None:
            raise TrainerInputError(f"--in-image: {what} {name}: recipe {prepared.name} starts from prepared "
                                    f"weights or data, which reach a container only through `python -m trainer "
                                    f"{prepared.name} --in-image`; run this {what} on the host")
        groups.setdefault(images[0], []).append(name)
    return groups


def _check_host(r: ResolvedRecipe, *, gpus: bool) -> None:
    """What the container cannot fix: GPUs (``gpus``: when the ranks run here), weights, data (the image is checked
    by the runtime)."""
    need, have = (needs_gpus(r), host_gpus()) if gpus else (0, 0)
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


def run_entries(entries: list[Entry], matrix: Path, *, runtime: str | None, dry_run: bool) -> int:
    """Run each entry in its image (the first failing code ends it); ``dry_run``: print the commands, check
    nothing. Bad input (no runtime, image not built or from another lock, GPUs, weights) is TrainerInputError."""
    environ = dict(os.environ)
    try:
        if dry_run:  # what would run, on any machine: nothing is checked
            backend = Backend(runtime, None if runtime == "docker" else "vfs") if runtime else find(None)
            for entry in entries:
                for argv in commands(backend, entry.needs(matrix), environ):
                    print(shown(argv, environ))
            return 0
        for entry in entries:
            for r in entry.recipes:
                _check_host(r, gpus=entry.ranks_here)
        backend = find(runtime)
        for entry in entries:
            check_built(backend, entry.image)
        for entry in entries:
            for folder in entry.writes:
                folder.mkdir(parents=True, exist_ok=True)  # the caller's, not the container's root
            code = run(backend, entry.needs(matrix), environ)
            if code:
                return code
        return 0
    except UsageError as exc:
        raise TrainerInputError(str(exc)) from None


def main(args: argparse.Namespace, r: ResolvedRecipe) -> int:
    return run_entries([train_entry(args, r)], Path(args.matrix).resolve(), runtime=args.runtime,
                       dry_run=args.dry_run)
