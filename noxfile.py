"""The workflow: every user-facing action is a nox session (thin: install, parse posargs, call a package).

`nox -l` lists them. Heavy sessions (train, tests) install the CPU torch stack; the matrix and image
sessions install only the light dependency groups of pyproject.toml. torch is installed with pip (the
virtualenv backend), because pip sees the CPU wheel configured for this machine and uv would fetch CUDA.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2025.5.1"
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["matrix"]  # a bare `nox` only validates the matrix

PYTHON = "3.11"
PYPROJECT = nox.project.load_toml(Path(__file__).parent / "pyproject.toml")


def _install_light(session: nox.Session, group: str) -> None:
    session.install(*nox.project.dependency_groups(PYPROJECT, group))
    session.install("--no-deps", "-e", ".")


def _images(session: nox.Session, command: str) -> None:
    _install_light(session, "images")
    session.run("python", "-m", "images", command, *session.posargs)


@nox.session(python=PYTHON)
def matrix(session: nox.Session) -> None:
    """Validate matrix.yaml and show its recipes (`-- --json` for the resolved form, `-- --file F`)."""
    _install_light(session, "matrix")
    session.run("python", "-m", "matrix", *session.posargs)


@nox.session(python=PYTHON)
def train(session: nox.Session) -> None:
    """Train a recipe (default: the embedded CPU demo): `nox -s train -- RECIPE key=value ...`."""
    loggers = any(a.split("=")[0] in ("--tensorboard", "--wandb") for a in session.posargs)
    session.install("-e", ".[logging]" if loggers else ".")
    session.run("python", "-m", "trainer", *(session.posargs or ["demo"]))


@nox.session(python=PYTHON)
def convert(session: nox.Session) -> None:
    """Convert checkpoints: `nox -s convert -- hf-to-mcore|mcore-to-hf|fsdp-to-hf|verify|fp8-to-bf16 ...`."""
    session.install("-e", ".")
    session.run("python", "-m", "trainer.convert", *(session.posargs or ["--help"]))


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (CI runs exactly this); posargs go to pytest, e.g. `-- -m 'not slow'`."""
    session.install("-e", ".[images,bench,grading,tensorboard,dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lock(session: nox.Session) -> None:
    """Resolve each image's Python set with hashes into images/locks/ (`-- --check` is offline)."""
    _images(session, "lock")


@nox.session(python=PYTHON)
def render(session: nox.Session) -> None:
    """Render build/images/<image>/Dockerfile and build/docker-bake.json from the matrix and locks."""
    _images(session, "render")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Render, then hadolint every Dockerfile (unpinned sources allowed here: lint checks the Dockerfiles)."""
    _install_light(session, "images")
    session.run("python", "-m", "images", "render", "--allow-unpinned", *session.posargs)
    session.run("python", "-m", "images", "lint", *session.posargs)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build images: `-- IMAGE ... [--backend docker|podman|buildah] [--dry-run]`."""
    _images(session, "build")


@nox.session(python=PYTHON)
def equivalence(session: nox.Session) -> None:
    """Run the layout-equivalence gates of the matrix: `-- GATE ...` (default: all); exit 1 if one fails."""
    session.install("-e", ".")
    session.run("python", "-m", "trainer.equivalence", *session.posargs)


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Run benchmark suites through the trainer: `-- [SUITE ...]` (default: cpu) → bench/results/<id>.json."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "bench", "run", *session.posargs)


@nox.session(python=PYTHON, default=False)
def report(session: nox.Session) -> None:
    """Compare results: `-- [BASELINE CANDIDATE ...] [--threshold 0.1]` → reports/<id>/ (md, html, png, csv)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "bench", "report", *session.posargs)
