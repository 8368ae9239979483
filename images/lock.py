"""`nox -s lock`: resolve each image's full Python set with uv, with hashes, into `images/locks/<image>.lock.txt`.

The lock header records the command that regenerates it, the resolver settings, every override with its reason,
and the input hash of the image's matrix entry; `--check` compares that hash offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from images.common import UsageError, atomic_write, lock_input_hash, sha256_text
from images.conflicts import explain
from images.summary import summarize, summary_json
from matrix.schema import Image

PUBLIC_INDEX = "https://pypi.org/simple"
INPUT_HASH_KEY = "# input-hash: "


def lock_path(locks_dir: Path, name: str) -> Path:
    return locks_dir / f"{name}.lock.txt"


def summary_path(locks_dir: Path, name: str) -> Path:
    return locks_dir / f"{name}.summary.json"


def regenerate_command(name: str) -> str:
    return f"nox -s lock -- {name}"


class ResolutionError(Exception):
    """The resolver found no solution (or could not run); the message is the full explanation."""


@dataclass(frozen=True)
class Sources:
    """Where the resolver looks besides PyPI, and what the header says about it."""

    indexes: list[str]
    find_links: list[str]
    note: str


def sources(image: Image, wheelhouse: list[Path]) -> Sources:
    """The image's extra indexes, or a local wheelhouse standing in for them (the air-gapped twin)."""
    public = image.pip.extra_index_urls
    if public and wheelhouse:
        links = [str(w) for w in wheelhouse] + image.pip.find_links
        return Sources([], links, f"wheelhouse {' '.join(links)} stood in for {' '.join(public)}; the public "
                                  f"equivalent is `--extra-index-url {' '.join(public)}` (same wheels by name; "
                                  "a hash differs only if the wheelhouse holds a rebuilt wheel)")
    note = f"{PUBLIC_INDEX} " + " ".join(f"--extra-index-url {u}" for u in public)
    return Sources(list(public), list(image.pip.find_links), note.strip())


def requirement_lines(image: Image) -> list[str]:
    """The engine first (with its extras), then the image's pins, as the resolver's input."""
    lines = []
    if image.engine:
        extras = f"[{','.join(image.engine.extras)}]" if image.engine.extras else ""
        lines.append(f"{image.engine.name}{extras}=={image.engine.version}")
    return lines + list(image.requirements)


def uv_command(image: Image, src: Sources, name: str, fmt: str) -> list[str]:
    """The `uv pip compile` call (run in a folder holding `<name>.in`, `.overrides.txt` and `.constraints.txt`)."""
    cmd = [sys.executable, "-m", "uv", "pip", "compile", f"{name}.in", "--no-config", "--quiet",
           "--python-version", image.python, "--python-platform", image.platform, "--format", fmt]
    if fmt == "requirements.txt":
        cmd.append("--generate-hashes")
    if image.overrides:
        cmd += ["--override", f"{name}.overrides.txt"]
    if image.constraints:
        cmd += ["--constraint", f"{name}.constraints.txt"]
    for url in src.indexes:
        cmd += ["--extra-index-url", url]
    for link in src.find_links:
        cmd += ["--find-links", link]
    return cmd


def _run_uv(cmd: list[str], cwd: Path, name: str, image: Image) -> str:
    env = os.environ | {"UV_CUSTOM_COMPILE_COMMAND": regenerate_command(name), "UV_PYTHON_DOWNLOADS": "never"}
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except OSError as exc:
        raise ResolutionError(f"cannot run uv ({exc}); install it with `pip install uv==0.13.9`") from None
    if done.returncode != 0:
        if "No module named uv" in done.stderr:
            raise ResolutionError("uv is not installed here; install it with `pip install uv==0.13.9`")
        raise ResolutionError(explain(name, image, done.stderr))
    return done.stdout


def header(name: str, image: Image, src: Sources) -> str:
    lines = [
        f"# Hash-locked Python set of image `{name}` (python {image.python}, {image.platform}).",
        f"# Regenerate: {regenerate_command(name)}    Check (offline): nox -s lock -- --check",
        f"{INPUT_HASH_KEY}{lock_input_hash(image)}",
        "#   (matrix.yaml images." + name + ": python, platform, engine, requirements, overrides, constraints, pip)",
        f"# resolver: uv pip compile --python-version {image.python} --python-platform {image.platform} "
        "--generate-hashes" + (" --override <overrides below>" if image.overrides else ""),
        f"# sources: {src.note}",
        "# overrides (they win over what any package asks for):" if image.overrides else "# overrides: none",
    ]
    for o in image.overrides:
        last = "; force-reinstalled after every other install step" if o.reinstall_last else ""
        lines.append(f"#   {o.pin}: {o.why}{last}")
    lines.append("# constraints (bounds the resolver cannot see):" if image.constraints else "# constraints: none")
    lines += [f"#   {c.bound}: {c.why}" for c in image.constraints]
    return "\n".join(lines) + "\n"


def resolve(name: str, image: Image, wheelhouse: list[Path]) -> tuple[str, dict]:
    """The lock text and the summary of one image; raises ResolutionError with the resolver's explanation."""
    src = sources(image, wheelhouse)
    with tempfile.TemporaryDirectory(prefix=f"lock-{name}-") as tmp:
        folder = Path(tmp)
        (folder / f"{name}.in").write_text("\n".join(requirement_lines(image)) + "\n")
        (folder / f"{name}.overrides.txt").write_text("".join(o.pin + "\n" for o in image.overrides))
        (folder / f"{name}.constraints.txt").write_text("".join(c.bound + "\n" for c in image.constraints))
        locked = _run_uv(uv_command(image, src, name, "requirements.txt"), folder, name, image)
        # The same resolution in PEP 751 form carries wheel sizes (the second run is served from uv's cache).
        pylock = _run_uv(uv_command(image, src, name, "pylock.toml"), folder, name, image)
    text = header(name, image, src) + locked
    summary = summarize(pylock)
    mismatch = sorted(p for p, v in summary["pinned"].items() if f"\n{p}=={v} " not in "\n" + locked)
    if mismatch:  # both runs must describe one resolution, or the sizes would describe another set
        raise ResolutionError(f"images.{name}: the two uv runs disagree on {', '.join(mismatch)}; run again")
    return text, summary


def lock_images(matrix, names: list[str], locks_dir: Path, wheelhouse: list[Path], console) -> dict[str, dict]:
    """Resolve and write each image's lock and summary; returns the summaries. Failures raise at the end."""
    summaries, failures = {}, []
    for name in names:
        image = matrix.images[name]
        started = time.monotonic()
        with console.status(f"resolving {name} (python {image.python}, {image.platform}) with uv…"):
            try:
                text, summary = resolve(name, image, wheelhouse)
            except ResolutionError as exc:
                failures.append(str(exc))
                console.print(f"[red]✗ {name}[/red]")
                continue
        seconds = round(time.monotonic() - started, 1)
        atomic_write(lock_path(locks_dir, name), text)
        extra = {"regenerate": regenerate_command(name), "input_hash": lock_input_hash(image),
                 "lock_hash": sha256_text(text), "python": image.python, "platform": image.platform}
        atomic_write(summary_path(locks_dir, name), summary_json(name, summary, extra))
        summaries[name] = summary
        console.print(f"[green]✓ {name}[/green]: {summary['packages']} packages, {summary['wheel_size']} of "
                      f"wheels, resolved in {seconds} s → {lock_path(locks_dir, name)}")
    if failures:
        raise ResolutionError("\n\n".join(failures))
    return summaries


def stored_input_hash(text: str) -> str | None:
    return next((line[len(INPUT_HASH_KEY):].strip() for line in text.splitlines()
                 if line.startswith(INPUT_HASH_KEY)), None)


def check_locks(matrix, names: list[str], locks_dir: Path) -> list[str]:
    """Offline: one problem per image whose lock is missing or was made from other matrix inputs."""
    problems = []
    for name in names:
        path = lock_path(locks_dir, name)
        if not path.is_file():
            problems.append(f"{path}: missing; create it with `{regenerate_command(name)}`")
            continue
        stored, now = stored_input_hash(path.read_text()), lock_input_hash(matrix.images[name])
        if stored != now:
            problems.append(f"{path}: stale, matrix.yaml images.{name} changed since the lock was made "
                            f"(lock {stored}, matrix {now}); regenerate with `{regenerate_command(name)}`")
    return problems


def wheelhouse_dirs(given: list[str], host_links: list[Path]) -> list[Path]:
    """`--wheelhouse` folders, else the host pip's find-links folders; a missing folder is bad input."""
    missing = [g for g in given if not Path(g).is_dir()]
    if missing:
        raise UsageError(f"--wheelhouse: {', '.join(missing)} is not a folder; pass a folder of wheels")
    return [Path(g) for g in given] if given else host_links
