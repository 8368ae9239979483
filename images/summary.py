"""Per-image summary of a resolution: package count, locked wheel size, and the versions that matter.

Sizes come from uv's own resolution in PEP 751 form (`pylock.toml`), which lists, for the target platform,
each wheel with its size from the index metadata; a wheel from a local wheelhouse is measured on disk.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

from rich.table import Table


def _wheel_size(wheel: dict) -> int | None:
    if "size" in wheel:
        return int(wheel["size"])
    url = urlparse(wheel.get("url", ""))
    if url.scheme == "file" and Path(unquote(url.path)).is_file():
        return Path(unquote(url.path)).stat().st_size
    return None


def _minor(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def summarize(pylock_text: str) -> dict:
    """Counts, bytes and key versions of one resolution (the text of a pylock.toml)."""
    packages = tomllib.loads(pylock_text).get("packages", [])
    versions = {p["name"]: str(p["version"]) for p in packages}
    wheel_bytes, unsized, sdist_only = 0, [], []
    for p in packages:
        if not p.get("wheels"):
            sdist_only.append(p["name"])
            continue
        # uv lists only the wheels that fit the target; pip installs one of them, so count the largest.
        sizes = [s for s in (_wheel_size(w) for w in p["wheels"]) if s is not None]
        if sizes:
            wheel_bytes += max(sizes)
        else:
            unsized.append(p["name"])
    torch = versions.get("torch")
    cuda = _minor(versions.get("nvidia-cuda-runtime-cu12"))
    if torch and "+cpu" in torch:
        cuda = "none (CPU build)"
    return {
        "packages": len(packages),
        "wheel_bytes": wheel_bytes,
        "wheel_size": f"{wheel_bytes / 1e9:.2f} GB" if wheel_bytes >= 1e9 else f"{wheel_bytes / 1e6:.0f} MB",
        "built_from_sdist": sorted(sdist_only),
        "size_unknown": sorted(unsized),
        "versions": {
            "torch": torch,
            "cuda": cuda,
            "cudnn": versions.get("nvidia-cudnn-cu12"),
            "transformers": versions.get("transformers"),
        },
        "pinned": versions,
    }


def summary_json(image: str, summary: dict, extra: dict) -> str:
    return json.dumps({"image": image, **extra, **summary}, indent=2, sort_keys=False) + "\n"


def table(rows: dict[str, dict]) -> Table:
    """One row per image: the numbers a reader checks before paying for a build."""
    t = Table(title="locked Python sets")
    for column in ("image", "packages", "wheels", "torch", "CUDA", "cuDNN", "transformers", "sdist-only"):
        t.add_column(column, justify="right" if column in ("packages", "wheels") else "left")
    for name, s in rows.items():
        v = s["versions"]
        t.add_row(name, str(s["packages"]), s["wheel_size"], v["torch"] or "-", v["cuda"] or "-",
                  v["cudnn"] or "-", v["transformers"] or "-", ", ".join(s["built_from_sdist"]) or "-")
    return t
