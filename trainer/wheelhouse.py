"""The wheels a bare GPU machine needs to run ``python -m trainer.smoke``: downloaded here, installed there offline.

The target: Linux x86_64, CPython 3.12, torch (2.11, CUDA 13) already installed with its own dependencies
(filelock, fsspec, jinja2, networkx, sympy, typing-extensions), no network. ``download(DIR)`` fetches, for that
target only (binary wheels, no dependency resolution), the exact versions this environment runs — the ones the
tests passed with — of every distribution the trainer imports beyond torch:

    pip download --dest DIR --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
                 --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 ... NAME==VERSION ...

On the GPU machine, from a checkout of this repository:

    PIP_BREAK_SYSTEM_PACKAGES=1 pip install --no-index --no-deps DIR/*.whl && python -m trainer.smoke

``nox -s smoke_bare`` rehearses that on CPU with the target's own torch (trainer/bare_gpu_torch.txt), so a module
the smoke imports beyond this list (pyarrow was one) fails in CI, not on the GPU machine.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# What the trainer imports on top of torch, with their own requirements (transformers → tokenizers,
# huggingface-hub → hf-xet, requests, ...; pydantic → pydantic-core, ...; rich → markdown-it-py, pygments).
# typing-extensions is torch's too, listed because pydantic-core needs a newer one than old torch images carry.
DISTRIBUTIONS = (
    "megatron-core",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "hf-xet",
    "safetensors",
    "regex",
    "pyyaml",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "charset-normalizer",
    "packaging",
    "tqdm",
    "numpy",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "rich",
    "markdown-it-py",
    "mdurl",
    "pygments",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
LIMIT_MIB = 64


def pins() -> list[str]:
    """``name==version`` of each distribution, as installed in this environment."""
    missing, pinned = [], []
    for name in DISTRIBUTIONS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            missing.append(name)
    if missing:
        raise SystemExit(
            f"error: {', '.join(missing)} not installed here: run in the environment the tests use"
        )
    return pinned


def download(directory: Path) -> list[Path]:
    """Download the wheels into ``directory``; returns them. Fails (exit 1) above ``LIMIT_MIB`` together."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--dest",
        str(directory),
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        *pins(),
    ]
    subprocess.run(command, check=True)
    wheels = sorted(directory.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total:7.2f} MiB  {len(wheels)} wheels in {directory}")
    if total > LIMIT_MIB:
        raise SystemExit(f"error: the wheelhouse is {total:.1f} MiB, over {LIMIT_MIB} MiB")
    print(
        f"on the GPU machine, in a checkout of this repository:\n"
        f"  PIP_BREAK_SYSTEM_PACKAGES=1 pip install --no-index --no-deps {directory}/*.whl && python -m trainer.smoke"
    )
    return wheels


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m trainer.wheelhouse DIR")
    download(Path(sys.argv[1]))
