"""Where a result was measured: code revision, matrix and lock hashes, image, hardware, loaded versions.

Versions are those of the modules as imported by this interpreter (the one the runs use), not what a lock
file says: a wheel reinstalled over another is caught here. Absent packages are recorded as null.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import subprocess
import warnings
from pathlib import Path

import torch

from trainer.preflight import IMAGE_ENV

# Images built by `nox -s build` set IMAGE_ENV to their name; a labels file, when an image ships one, adds
# its OCI labels (revision, matrix and lock hashes). Outside any image the name is "host". A container cannot
# know its own digest: whoever starts it (the planned `--in-image` launcher) passes it in DIGEST_ENV.
IMAGE_LABELS_FILE = Path("/etc/grpo-stack/labels.json")
DIGEST_ENV = "GRPO_STACK_IMAGE_DIGEST"


def _git(root: Path, *args: str) -> str | None:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(module: str) -> str | None:
    try:
        with warnings.catch_warnings():  # megatron-core warns at import that TE/apex are absent (expected on CPU)
            warnings.simplefilter("ignore")
            return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception:  # an absent or broken optional package is recorded, not fatal
        return None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def image() -> dict:
    """The image this runs in: its labels when the image recorded them, else just whether it is a container."""
    inside = Path("/.dockerenv").exists() or Path("/run/.containerenv").exists() or "container" in os.environ
    labels = json.loads(IMAGE_LABELS_FILE.read_text()) if IMAGE_LABELS_FILE.exists() else {}
    name = os.environ.get(IMAGE_ENV) or labels.get("io.grpo-stack.image") or "host"
    return {"inside_container": inside, "labels": labels, "name": name,
            "digest": os.environ.get(DIGEST_ENV)}


def capture(root: Path, matrix_path: Path) -> dict:
    """The environment record of a result (see the module docstring)."""
    cuda = torch.cuda.is_available()
    return {
        "git": {"revision": _git(root, "rev-parse", "HEAD"),
                "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no"))},
        "matrix_sha256": _sha256(matrix_path),
        "locks_sha256": {p.name: _sha256(p) for p in sorted((root / "images" / "locks").glob("*.lock.txt"))},
        "image": image(),
        "host": {"python": platform.python_version(), "platform": platform.platform(),
                 "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_average": os.getloadavg()},
        "gpu": {"count": torch.cuda.device_count(),
                "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
        if cuda else {"count": 0, "names": []},
        "versions": {
            "torch": torch.__version__,
            "megatron-core": _version("megatron.core"),
            "transformers": _version("transformers"),
            "transformer-engine": _version("transformer_engine"),
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "cuda": torch.version.cuda,
        },
    }
