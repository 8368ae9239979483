"""A CPU environment built from a GPU image's lock, so that a lock which breaks the harness fails CI.

The GPU images run Python 3.12 with a CUDA torch, which this machine cannot run. What can be checked here is
everything else the harness imports: the environment holds the lock's own version (hash-checked) of every
package in the closure of the harness's requirements (pyproject.toml `dependencies`), with the CPU torch and the
test tools of the running environment behind them on `sys.path`. Two checks run in it:

- `import_problems`: every top-level module of those locked packages imports (pyarrow 26 with numpy 1.26
  raises ImportError at import, and no resolver can see that: pyarrow declares no numpy dependency);
- `TRAINER_TESTS`: the trainer's CPU tests that build megatron-core models, load HF weights and read parquet
  (megatron-core 0.14's `Attention` calls the core attention with `model_comm_pgs=`, which the trainer rejects).
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from images import fingerprint, lockfile
from images.common import BUILD_DIR, REPO_ROOT, sha256_text

TRAINER_TESTS = (
    "tests/trainer/models/test_attention.py",
    "tests/trainer/backends/test_megatron_backend.py",
    "tests/trainer/test_math_lighteval.py",
)
"""A focused subset of the trainer's CPU tests: model build and training on megatron-core, HF weights, parquet."""
TRAINER_SKIP = "not bit_identical and not resume"
"""Left out for time (the longest two, ~20 s here): they repeat training steps the kept tests already run."""

NOT_FROM_LOCK = {"torch"}
"""Kept from the running environment: the lock's torch is a CUDA build; the CPU build stands in for it."""

def harness_roots() -> set[str]:
    """Normalized names of the harness's requirements (pyproject.toml `dependencies`)."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {lockfile.normalize(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in deps}


def locked_set(lock_text: str) -> list[lockfile.Pin]:
    """The lock's pins the environment installs: the harness's closure, less what the running environment keeps."""
    pins = lockfile.parse(lock_text)
    names = lockfile.closure(pins, harness_roots(), stop=NOT_FROM_LOCK)
    return [pins[n] for n in sorted(names)]


def missing_requirements(lock_text: str) -> list[str]:
    """The harness's requirements the lock lacks (the harness goes into images with --no-deps; this is the check
    that its requirements are there; their versions are tested by running the trainer's tests on them)."""
    pins = lockfile.parse(lock_text)
    return sorted(n for n in harness_roots() - NOT_FROM_LOCK if n not in pins)


def env_dir(name: str) -> Path:
    return BUILD_DIR / "lock-env" / name


def python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def build_env(name: str, lock_text: str, folder: Path | None = None) -> Path:
    """Create (or reuse, when made from the same lock) the environment; returns its interpreter.

    The locked packages are installed first, into an empty venv, with `--no-deps --require-hashes`; only then is
    the running environment's site-packages appended behind them (a `.pth` file), so the lock's versions win.
    """
    folder = folder or env_dir(name)
    pins = locked_set(lock_text)
    requirements = "".join(p.block for p in pins)
    stamp = folder / "made-from.txt"
    marker = sha256_text(requirements + sys.prefix)
    if stamp.is_file() and stamp.read_text().strip() == marker:
        return python_of(folder)
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(folder)], check=True)
    (folder / "requirements.txt").write_text(requirements)
    install = [sys.executable, "-m", "pip", "--python", str(python_of(folder)), "install", "--quiet",
               "--no-deps", "--require-hashes", "--no-compile", "-r", str(folder / "requirements.txt")]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing {name}'s locked set failed:\n{done.stderr[-3000:]}")
    site = subprocess.run([str(python_of(folder)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    behind = sysconfig.get_paths()["purelib"]
    (Path(site) / "zz-running-environment.pth").write_text(f"import site; site.addsitedir({behind!r})\n")
    stamp.write_text(marker + "\n")
    return python_of(folder)


def import_problems(python: Path, lock_text: str) -> list[str]:
    """One line per top-level module of the locked set that fails to import: `module (pkg==ver): error`."""
    pins = locked_set(lock_text)
    owner = {}
    for name, modules in fingerprint.top_level_modules(python, [p.name for p in pins]).items():
        pin = next(p for p in pins if p.name == name)
        owner.update({m: f"{pin.name}=={pin.version}" for m in modules if m not in owner})
    failed = fingerprint.import_failures(python, sorted(owner))
    return [f"{module} ({owner[module]}): {error}" for module, error in sorted(failed.items())]


def run_trainer_tests(python: Path, tests: tuple[str, ...] = TRAINER_TESTS,
                      select: str = TRAINER_SKIP) -> subprocess.CompletedProcess:
    """pytest on `tests` (those of them that exist, `-k select`) with the environment's interpreter."""
    tests = tuple(t for t in tests if (REPO_ROOT / t.split("::")[0]).is_file())
    if not tests:
        raise FileNotFoundError("none of the trainer tests in images/lockenv.py TRAINER_TESTS exists; update it")
    return subprocess.run([str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", select, *tests],
                          capture_output=True, text=True, cwd=REPO_ROOT)
