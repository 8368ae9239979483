"""GPU images compile in a builder stage and install its wheels by hash; the cpu image's steps stay as they were."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile

import pytest
from rich.console import Console

from images import render
from images.common import LOCKS_DIR, REPO_ROOT
from matrix import load_matrix

from .conftest import DATA

GPU = ["vllm-te27", "sglang-te27"]


@pytest.fixture(scope="module")
def dockerfiles(tmp_path_factory):
    m, out = load_matrix(), tmp_path_factory.mktemp("rendered") / "images"
    render.render(m, list(m.images), LOCKS_DIR, REPO_ROOT / "matrix.yaml",
                  console=Console(quiet=True), out_dir=out)
    return {n: (out / n / "Dockerfile").read_text() for n in m.images}


def stages(text: str) -> dict[str, str]:
    """Stage name → its text (a stage without `AS` is named by its position)."""
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {(p.split("\n", 1)[0].split(" AS ") + [str(i)])[1]: p for i, p in enumerate(parts)}


def runs(text: str) -> list[str]:
    """Every RUN instruction, continuation lines joined."""
    return [m.group(0) for m in re.finditer(r"^RUN (?:.*\\\n)*.*$", text, flags=re.M)]


@pytest.mark.parametrize("image", GPU)
def test_a_builder_stage_compiles_every_source_build_into_a_wheel(dockerfiles, image):
    found = stages(dockerfiles[image])
    assert list(found) == ["locked", "builder", "runtime"]
    assert found["builder"].startswith("locked AS builder\n") and found["runtime"].startswith("locked AS runtime\n")
    builds = load_matrix().images[image].source_builds
    wheel_steps = [r for r in runs(found["builder"]) if " wheel " in r]
    assert len(wheel_steps) == len(builds)  # one build per RUN: a failure names its build
    for step, (name, build) in zip(wheel_steps, builds.items(), strict=True):
        assert f"-m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels/{name} " in step
        assert step.endswith(f'"git+{build.git}@{build.commit}"')
        assert "MAX_JOBS=8 NVCC_THREADS=4 NVTE_BUILD_THREADS_PER_JOB=1 TORCH_CUDA_ARCH_LIST=9.0 " in step
        assert ("CUDNN_PATH=" in step and "/usr/local/cuda/include/" in step) == build.cudnn_from_wheel


@pytest.mark.parametrize("image", GPU)
def test_the_runtime_stage_installs_the_wheels_by_hash_and_compiles_nothing(dockerfiles, image):
    found = stages(dockerfiles[image])
    runtime, builder = found["runtime"], found["builder"]
    assert "COPY --from=builder /wheels/source-builds.txt /etc/grpo-stack/source-builds.txt\n" in runtime
    assert ("RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \\\n    python3 -m pip install "
            "--no-cache-dir --no-compile --no-deps --no-index --require-hashes -r /etc/grpo-stack/source-builds.txt"
            ) in runtime
    for compiler_trace in ("ccache", "pip wheel", "CUDNN_PATH", "apt-get", "NVCC", "MAX_JOBS"):
        assert compiler_trace not in runtime, compiler_trace
    # A build ARG ends with its stage: without this the harness install and fingerprint would write bytecode.
    assert "\nARG PYTHONDONTWRITEBYTECODE=1\n" in runtime
    # The harness enters the runtime stage only, after the wheels: an edit to it rebuilds nothing compiled.
    assert "COPY harness/" not in found["locked"] + builder and "COPY harness/" in runtime
    assert runtime.index("--require-hashes -r /etc/grpo-stack/source-builds.txt") < runtime.index("COPY harness/")


@pytest.mark.parametrize("image", GPU)
def test_gpu_steps_use_cache_mounts_and_mount_only_what_they_read(dockerfiles, image):
    found = stages(dockerfiles[image])
    locked = next(r for r in runs(found["locked"]) if "-r /ctx/lock.txt" in r)
    assert "--mount=type=cache,id=grpo-stack-pip,target=/root/.cache/pip" in locked
    assert "--cache-dir /root/.cache/pip" in locked and "--no-cache-dir" not in locked
    assert "--require-hashes" in locked
    assert "--mount=type=bind,source=lock.txt,target=/ctx/lock.txt" in locked
    builder = found["builder"]
    assert "apt-get install -y --no-install-recommends ccache" in builder
    assert "rm -rf /var/lib/apt/lists/*" in builder  # the base stage's apt hygiene
    for line in ("CCACHE_DIR=/root/.ccache", "PATH=/usr/lib/ccache:$PATH", "CMAKE_CUDA_COMPILER_LAUNCHER=ccache",
                 'PYTORCH_NVCC="ccache /usr/local/cuda/bin/nvcc"'):
        assert line in builder, line
    for step in (r for r in runs(builder) if " wheel " in r):
        assert "--mount=type=cache,id=grpo-stack-ccache,target=/root/.ccache" in step
        assert "--mount=type=bind" not in step  # a build reads nothing of the context


def _wheel(path, name: str) -> None:
    info = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_the_rendered_hash_list_installs_and_refuses_a_changed_wheel(dockerfiles, tmp_path):
    """The builder's hash step and the runtime's install, as rendered, run on two stand-in wheels."""
    builder, runtime = stages(dockerfiles["sglang-te27"])["builder"], stages(dockerfiles["sglang-te27"])["runtime"]
    wheels = tmp_path / "wheels"
    for build in ("apex", "flash-attn"):
        (wheels / build).mkdir(parents=True)
        _wheel(wheels / build / f"{build.replace('-', '_')}-0.1-py3-none-any.whl", build.replace("-", "_"))
    hash_step = next(r for r in runs(builder) if "sha256sum" in r)
    script = hash_step.removeprefix("RUN ").replace("/tmp/wheels.sha256", "SUMS").replace("/wheels", str(wheels))
    script = script.replace("SUMS", str(tmp_path / "sums"))
    subprocess.run(["sh", "-c", script], check=True)
    listed = (wheels / "source-builds.txt").read_text().splitlines()
    digest = hashlib.sha256((wheels / "apex" / "apex-0.1-py3-none-any.whl").read_bytes()).hexdigest()
    assert listed[0] == f"{wheels}/apex/apex-0.1-py3-none-any.whl --hash=sha256:{digest}" and len(listed) == 2

    install = next(r for r in runs(runtime) if "source-builds.txt" in r).split("python3 -m pip install ", 1)[1].replace(
        "/etc/grpo-stack/source-builds.txt", str(wheels / "source-builds.txt"))
    pip = [sys.executable, "-m", "pip", "install", "--target", str(tmp_path / "site"), *install.split()]
    assert subprocess.run(pip, capture_output=True, text=True).returncode == 0
    assert (tmp_path / "site" / "flash_attn" / "__init__.py").is_file()
    _wheel(wheels / "apex" / "apex-0.1-py3-none-any.whl", "apex_changed")
    refused = subprocess.run(pip, capture_output=True, text=True)
    assert refused.returncode != 0 and "DO NOT MATCH THE HASHES" in refused.stderr


@pytest.mark.parametrize("image", [*GPU, "cpu"])
def test_no_step_mounts_the_whole_context(dockerfiles, image):
    """BuildKit keys a step on the content of what it bind-mounts: a whole-context mount below the harness would
    reinstall the locked set after any edit to the trainer (the docker slow test rebuilds after one)."""
    assert "--mount=type=bind,target=/ctx " not in dockerfiles[image]
    assert "--mount=type=bind,source=lock.txt,target=/ctx/lock.txt" in dockerfiles[image]


def test_the_cpu_image_keeps_its_steps(dockerfiles):
    """cpu's build steps are the ones its two-build digest test ran: one stage, no cache mount, no builder. After
    a deliberate change to them, re-run that slow test (and the docker one), then store the new rendering (up to
    SOURCE_DATE_EPOCH, which moves with every commit) in tests/images/data/cpu.Dockerfile.txt."""
    text = dockerfiles["cpu"]
    assert text[:text.index("ARG SOURCE_DATE_EPOCH=")] == (DATA / "cpu.Dockerfile.txt").read_text()
    assert list(stages(text)) == ["0"] and "type=cache" not in text
