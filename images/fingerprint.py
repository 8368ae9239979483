"""The image fingerprint: what an image holds when its build ends, and drift from it and from its lock.

The last build step runs `python -m images.fingerprint record`, which writes, beside the image's copy of its
lock (`/etc/grpo-stack/lock.txt`), `fingerprint.json`: every installed distribution (name, version, sha256 of
its RECORD, which changes when a package is reinstalled from another build) and, for each top-level module of
the locked packages, whether it imports without a GPU. `drift()` compares what is installed now with both: a
package of the lock missing or at another version, and a package added, removed, upgraded or reinstalled since
the build. `python -m trainer` calls it inside an image and refuses to start on drift (`--ignore-drift`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from images import lockfile

IMAGE_DIR = Path("/etc/grpo-stack")
"""Inside an image: `lock.txt` (the image's lock) and `fingerprint.json`."""
LOCK_NAME, FINGERPRINT_NAME = "lock.txt", "fingerprint.json"


def installed() -> dict[str, dict[str, str]]:
    """Installed distributions of this interpreter by normalized name: version and the sha256 of RECORD."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        record = dist.read_text("RECORD") or ""
        out.setdefault(lockfile.normalize(name), {"version": dist.version,
                                                   "record": hashlib.sha256(record.encode()).hexdigest()})
    return dict(sorted(out.items()))


_MODULES = """
import json, sys
from importlib import metadata
out = {}
for name in sys.argv[1:]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    top = (dist.read_text("top_level.txt") or "").split()
    if not top:  # no top_level.txt (not setuptools-built): the first folder or module of each installed file
        for f in dist.files or []:
            first = f.parts[0]
            if len(f.parts) > 1 and not first.endswith((".dist-info", ".data")) and first not in ("..", "bin"):
                top.append(first)
            elif len(f.parts) == 1 and first.endswith(".py"):
                top.append(first[:-3])
    out[name] = sorted({t for t in top if t.isidentifier() and not t.startswith("_")})
print(json.dumps(out))
"""

_IMPORTS = """
import importlib, json, sys
failed = {}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except BaseException as exc:  # every failure is a finding, SystemExit included
        failed[module] = (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0][:300]
print(json.dumps(failed))
"""


def _json_of(python: Path | str, script: str, args: list[str]) -> dict:
    done = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""}, cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"{python} crashed while importing: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def top_level_modules(python: Path | str, names: list[str]) -> dict[str, list[str]]:
    """The top-level modules of each named distribution installed for `python` (absent ones are left out)."""
    return _json_of(python, _MODULES, names)


def import_failures(python: Path | str, modules: list[str]) -> dict[str, str]:
    """The modules that fail to import in one fresh `python` (no GPU visible), with the error's first line."""
    return _json_of(python, _IMPORTS, modules)


def record(lock_path: Path, out: Path) -> dict:
    """Write the fingerprint of this interpreter's environment (the build's last step)."""
    pins = lockfile.parse(lock_path.read_text())
    modules = sorted({m for ms in top_level_modules(sys.executable, [p.name for p in pins.values()]).values()
                      for m in ms})
    failed = import_failures(sys.executable, modules)
    data = {"installed": installed(), "imports": {m: failed.get(m, "ok") for m in modules}}
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def drift(lock_path: Path, fingerprint_path: Path | None = None) -> list[str]:
    """One line per package that differs from the lock or from the build's fingerprint; empty: no drift."""
    fingerprint_path = fingerprint_path or lock_path.with_name(FINGERPRINT_NAME)
    now = installed()
    problems = []
    for name, pin in lockfile.parse(lock_path.read_text()).items():
        have = now.get(name)
        if have is None:
            problems.append(f"{pin.name}: locked {pin.version}, not installed")
        elif have["version"] != pin.version:
            problems.append(f"{pin.name}: locked {pin.version}, installed {have['version']}")
    built = json.loads(fingerprint_path.read_text())["installed"] if fingerprint_path.is_file() else None
    if built is None:
        return problems + [f"{fingerprint_path}: missing, so packages outside the lock cannot be checked"]
    for name in sorted(set(built) | set(now)):
        was, have = built.get(name), now.get(name)
        if was == have:
            continue
        if was is None:
            problems.append(f"{name}: installed {have['version']} after the build")
        elif have is None:
            problems.append(f"{name}: removed after the build (was {was['version']})")
        elif was["version"] != have["version"]:
            problems.append(f"{name}: built with {was['version']}, installed {have['version']}")
        else:
            problems.append(f"{name}: {have['version']} reinstalled after the build (its RECORD changed)")
    return sorted(set(problems))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m images.fingerprint", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("record", "drift"))
    p.add_argument("--dir", type=Path, default=IMAGE_DIR, help=f"folder of {LOCK_NAME} (default: {IMAGE_DIR})")
    args = p.parse_args(argv)
    lock = args.dir / LOCK_NAME
    if args.command == "record":
        data = record(lock, args.dir / FINGERPRINT_NAME)
        failed = {m: e for m, e in data["imports"].items() if e != "ok"}
        print(f"fingerprint: {len(data['installed'])} packages, {len(data['imports']) - len(failed)} of "
              f"{len(data['imports'])} locked modules import without a GPU")
        for module, error in failed.items():
            print(f"  {module}: {error}")
        return 0
    problems = drift(lock)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
