"""The record of finished `prepare` steps: per step, the sha256 of each input and output (file or folder).

A step counts as done only when its entry is here and the hashes of its inputs and outputs as they are now
equal the recorded ones; the entry is written (atomically) after the step's output is in place, so an
interrupted step has no entry and is redone. Hashing a checkpoint again on every run would cost minutes, so
each file's hash is cached with its size and mtime: an unchanged file is not read again, a touched one is.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from trainer.prepare.places import MANIFEST

CHUNK = 1 << 22
PROGRESS_ABOVE = 256 << 20  # hashing shows progress for files above this size


class Manifest:
    def __init__(self, folder: Path):
        self.path = folder / MANIFEST
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.steps: dict[str, dict] = data.get("steps", {})
        self.cache: dict[str, list] = data.get("hash_cache", {})

    # -------------------------------------------------------------- hashing

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        cached = self.cache.get(key)
        if cached and cached[:2] == stamp:
            return cached[2]
        value = sha256_file(path)
        self.cache[key] = [*stamp, value]
        return value

    def hash(self, path: Path) -> str | None:
        """A file's sha256, or a folder's (over its files' relative paths and hashes; hidden entries such as
        temporary siblings and download caches left out); None when absent."""
        if path.is_file():
            return self.file_hash(path)
        if not path.is_dir():
            return None
        digest = hashlib.sha256()
        for f in sorted(files(path)):
            digest.update(f"{f.relative_to(path)}\0{self.file_hash(f)}\n".encode())
        return "sha256:" + digest.hexdigest()

    def hashes(self, paths: list[Path]) -> dict[str, str | None]:
        return {str(p): self.hash(p) for p in paths}

    # -------------------------------------------------------------- steps

    def done(self, step_id: str, inputs: list[Path], outputs: list[Path]) -> bool:
        entry = self.steps.get(step_id)
        if not entry:
            return False
        now_in = self.hashes(inputs)
        if None in now_in.values() or entry["inputs"] != now_in:
            return False
        return entry["outputs"] == self.hashes(outputs)

    def record(self, step_id: str, inputs: list[Path], outputs: list[Path]) -> None:
        self.steps[step_id] = {"inputs": self.hashes(inputs), "outputs": self.hashes(outputs),
                               "finished": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.save()

    def forget(self, step_id: str) -> None:
        if self.steps.pop(step_id, None) is not None:
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"steps": self.steps, "hash_cache": self.cache}, indent=2) + "\n")
        os.replace(tmp, self.path)


def sha256_file(path: Path) -> str:
    digest, total = hashlib.sha256(), path.stat().st_size
    with path.open("rb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"hash {path.name}",
                                    disable=total < PROGRESS_ABOVE, leave=False) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return "sha256:" + digest.hexdigest()


def files(folder: Path) -> list[Path]:
    """The files under ``folder``, hidden entries (temporary siblings, download caches) left out."""
    out = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(here) / n for n in names if not n.startswith(".")]
    return out


def size(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else files(p) if p.is_dir() else []))
