"""Shared pieces of the images pipeline: paths, refusals, image selection, hashes, atomic writes, git facts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

from matrix import DEFAULT_MATRIX_PATH, Matrix, MatrixError, load_matrix
from matrix.schema import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCKS_DIR = REPO_ROOT / "images" / "locks"
PATCHES_DIR = REPO_ROOT / "images" / "patches"
BUILD_DIR = REPO_ROOT / "build"
MATRIX_ENV = "GRPO_MATRIX"
"""Environment variable naming another matrix file (tests use a temporary copy; the real file stays put)."""


class UsageError(Exception):
    """Bad input: printed as one line per problem, exit code 2, nothing written."""


def matrix_path(given: str | None) -> Path:
    return Path(given or os.environ.get(MATRIX_ENV) or DEFAULT_MATRIX_PATH)


def load(given: str | None) -> Matrix:
    """The validated matrix; its problems become a UsageError (each located by file, line and YAML path)."""
    try:
        return load_matrix(matrix_path(given))
    except MatrixError as exc:
        raise UsageError(str(exc)) from None


def select_images(matrix: Matrix, names: list[str], *, flag: str = "IMAGE") -> list[str]:
    """The named images in matrix order, all of them when none is named; unknown names list the valid ones."""
    valid = list(matrix.images)
    unknown = [n for n in names if n not in matrix.images]
    if unknown:
        raise UsageError(f"{flag}: unknown image {', '.join(repr(n) for n in unknown)}; "
                         f"valid images (matrix.yaml images): {', '.join(valid)}")
    return [n for n in valid if n in names] if names else valid


def sha256_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def canonical(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def lock_input_hash(image: Image) -> str:
    """Hash of what decides an image's resolution (the lock's inputs); `description`, apt, patches do not."""
    keys = ("python", "platform", "engine", "requirements", "overrides", "constraints", "pip")
    return sha256_text(canonical(image.model_dump(mode="json", include=set(keys))))


def image_hash(image: Image) -> str:
    """Hash of the whole matrix entry of an image (the `matrix-hash` label)."""
    return sha256_text(canonical(image.model_dump(mode="json")))


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH: the environment's if set (reproducible-builds convention), else the last commit's time."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    return int(_git("log", "-1", "--format=%ct") or 0)


def git_revision() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def display(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
