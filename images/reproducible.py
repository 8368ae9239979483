"""Why two builds of one image differ: the files whose content, mode, owner or time differ between their layers.

Both images are exported as OCI layouts; each layer is read as a tar, and the files of the final filesystem of
each image (later layers win; whiteouts remove) are compared. `python -m images.reproducible A B` prints them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from images.backends import Backend


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / digest.replace(":", "/")).read_bytes()


def files(layout: Path) -> dict[str, str]:
    """path → a description (type, mode, owner, mtime, sha256) of each file of the image in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
    out: dict[str, str] = {}
    for layer in manifest["layers"]:
        data = _blob(layout, layer["digest"])
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                folder, _, base = name.rpartition("/")
                if base.startswith(".wh."):
                    gone = f"{folder}/{base[4:]}".lstrip("/")
                    out = {k: v for k, v in out.items() if k != gone and not k.startswith(gone + "/")}
                    continue
                content = tar.extractfile(member).read() if member.isfile() else member.linkname.encode()
                out[name] = (f"type={member.type!r} mode={member.mode:o} owner={member.uid}:{member.gid} "
                             f"mtime={member.mtime} sha256={hashlib.sha256(content).hexdigest()[:16]}")
    return out


def export(backend: Backend, ref: str, folder: Path) -> Path:
    if backend.name == "docker":
        raise ValueError("comparing files needs buildah or podman (`docker save` writes no OCI layout here)")
    subprocess.run(backend._tool() + ["push", ref, f"oci:{folder}"], check=True, capture_output=True)
    return folder


def differing_files(backend: Backend, first: str, second: str) -> list[str]:
    """One line per file that differs between the two images (empty: the filesystems are identical)."""
    with tempfile.TemporaryDirectory(prefix="grpo-stack-compare-") as tmp:
        a = files(export(backend, first, Path(tmp) / "a"))
        b = files(export(backend, second, Path(tmp) / "b"))
    lines = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            lines.append(f"{path}: {a.get(path, 'absent')} | {b.get(path, 'absent')}")
    return lines


if __name__ == "__main__":
    found = differing_files(Backend("buildah", "vfs"), sys.argv[1], sys.argv[2])
    print("\n".join(found) or "no file differs")
    sys.exit(1 if found else 0)
