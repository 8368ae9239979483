"""The `cpu` image built with `--backend docker` on a real engine (CI starts its own: .ci/run): the same lock and
matrix labels as the buildah build, a random token passed as build secrets found in no layer of `docker save`, and
demo episodes and the drift check run in a container (`docker run`, then `docker exec`); after an edit to one trainer
file, a cached rebuild reuses every layer below the harness. One cold build and one cached one; the module takes
~3 min here. Everything it made (images, container, build cache) is removed at the end. Slow: skip locally
with `-m 'not slow'`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from images.backends import docker_backend
from images.cli import main
from images.common import BUILD_DIR, LOCKS_DIR, UsageError, image_hash, load, sha256_text
from images.render import bootstrap_tag, tag

from .test_build_cpu_slow import train_in_image

BACKEND = docker_backend()


def _unusable() -> str | None:
    try:
        BACKEND.check_usable()
    except UsageError as exc:
        return f"{exc} (CI starts its own engine: see .ci/run)"
    return None


UNUSABLE = _unusable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UNUSABLE is not None, reason=str(UNUSABLE)),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root"),
]
DOCKER = BACKEND.client


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check)


def _images() -> set[str]:
    return set(_docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())


def _build_cache() -> set[str]:
    return {r["ID"] for r in json.loads(_docker("system", "df", "-v", "--format", "{{json .BuildCache}}").stdout) or []}


def _remove_build_cache(ids: set[str]) -> None:
    """Prune the given build-cache records; a parent goes once its children have (the filter takes one id)."""
    for _ in range(len(ids)):
        ids &= _build_cache()
        if not ids:
            return
        for record in ids:
            _docker("builder", "prune", "--force", "--filter", f"id={record}", check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build `cpu` once, cold, with a random token inside a netrc secret and a CA-bundle secret."""
    images_before, cache_before = _images(), _build_cache()
    token = "grpo-secret-" + secrets.token_hex(16)
    folder = tmp_path_factory.mktemp("secrets")
    (folder / "netrc").write_text(f"machine index.invalid login ci password {token}\n")
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    (folder / "ca.pem").write_text(f"# {token}\n" + (host_ca.read_text() if host_ca.is_file() else ""))
    try:
        assert main(["render", "cpu"]) == 0
        assert main(["build", "cpu", "--backend", "docker", "--no-cache", "--secret", f"netrc={folder / 'netrc'}",
                     "--secret", f"ca.pem={folder / 'ca.pem'}"]) == 0
        yield token, json.loads((BUILD_DIR / "images" / "cpu" / "build.json").read_text())
    finally:
        made = {tag("cpu"), f"{tag('cpu')}-building"} | ({bootstrap_tag(load(None).images["cpu"])} - images_before)
        for image in made & _images():
            _docker("rmi", image, check=False)
        _remove_build_cache(_build_cache() - cache_before)


def test_labels_name_the_lock_and_the_matrix(built):
    _, record = built
    cpu = load(None).images["cpu"]
    assert record["backend"] == "docker" and record["size_bytes"] > 0 and record["duration_s"] > 0
    assert record["base"] == bootstrap_tag(cpu)
    assert record["labels"]["io.grpo-stack.lock-hash"] == sha256_text((LOCKS_DIR / "cpu.lock.txt").read_text())
    assert record["labels"]["io.grpo-stack.matrix-hash"] == image_hash(cpu)
    assert record["labels"]["org.opencontainers.image.title"] == "grpo-stack-cpu"
    assert f"{tag('cpu')}-building" not in _images(), "the temporary build tag must be gone"


def _holds(stream, needle: bytes) -> bool:
    tail = b""
    while chunk := stream.read(1 << 20):
        if needle in tail + chunk:
            return True
        tail = chunk[-len(needle):]
    return False


def test_no_layer_holds_the_secret(built, tmp_path):
    token, record = built
    archive = tmp_path / "cpu.tar"  # ~1.4 GB: deleted here, not left to pytest's rotation of temporary folders
    _docker("save", "-o", str(archive), tag("cpu"))
    try:
        with tarfile.open(archive) as saved:
            members = [m for m in saved if m.isfile()]
            layers = [m for m in members if m.name.endswith("layer.tar")]
            # The scan must be able to see content: the lock hash label is in the config, the harness in a layer.
            assert any(_holds(saved.extractfile(m), record["labels"]["io.grpo-stack.lock-hash"].encode())
                       for m in members if m.name.endswith(".json"))
            assert any(_holds(saved.extractfile(m), b"opt/grpo-stack/matrix.yaml") for m in layers)
            leaked = [m.name for m in members if _holds(saved.extractfile(m), token.encode())]
    finally:
        archive.unlink()
    assert len(layers) >= 5 and leaked == [], f"secret found in {leaked}"


def _steps(log: str) -> list[tuple[str, bool]]:
    """BuildKit's plain progress (``#8 [5/8] RUN ...``, later ``#8 CACHED``) → (instruction, cached) of each
    Dockerfile step after FROM, in Dockerfile order (the log interleaves them, and adds internal steps)."""
    found: dict[str, tuple[int, str]] = {}
    cached: set[str] = set()
    for line in log.splitlines():
        match = re.match(r"(#\d+) \[(\d+)/\d+\] (.*)", line)
        if match and not match.group(3).startswith("FROM "):
            found.setdefault(match.group(1), (int(match.group(2)), match.group(3)))
        elif line.split(" ", 1)[-1].strip() == "CACHED":
            cached.add(line.split(" ", 1)[0])
    return [(instruction, step in cached) for step, (_, instruction) in sorted(found.items(), key=lambda s: s[1][0])]


@pytest.fixture(scope="module")
def rebuilt(built):
    """The image built again, with layer caching, after an edit to one trainer file of the harness (in the
    repository: `build` renders the context it builds from the sources, so an edit to the rendered copy is undone)."""
    _, record = built
    edited = Path(__file__).resolve().parents[2] / "trainer" / "loop.py"
    original = edited.read_text()
    edited.write_text(original + "\n# an edit after the first build\n")
    try:
        assert main(["build", "cpu", "--backend", "docker"]) == 0
    finally:
        edited.write_text(original)
    _docker("rmi", record["id"], check=False)  # the first build, untagged now
    return _steps((BUILD_DIR / "images" / "cpu" / "build.log").read_text())


def test_demo_trains_in_image_through_the_trainer(built, tmp_path):
    train_in_image("docker", tmp_path / "runs")


def test_an_edit_to_the_harness_rebuilds_only_from_the_harness_layer(rebuilt):
    """Every step below `COPY harness/` comes from the cache (the pip steps mount only what they read, so the
    locked set is not keyed on the harness's files); the harness step and those after it run again."""
    harness = next(i for i, (instruction, _) in enumerate(rebuilt) if instruction.startswith("COPY harness/"))
    below = rebuilt[:harness]
    assert any("-r /ctx/lock.txt" in instruction for instruction, _ in below)
    assert [instruction for instruction, cached in below if not cached] == []
    assert not rebuilt[harness][1], "the edited harness must be copied again"


@pytest.fixture(scope="module")
def container(built):
    """One container for every command: under vfs each `docker run` copies the whole image twice (~30 s here)."""
    name = f"grpo-stack-test-{secrets.token_hex(4)}"
    _docker("run", "-d", "--network", "none", "--name", name, tag("cpu"), "sleep", "infinity")
    try:
        yield name
    finally:
        _docker("rm", "--force", name, check=False)


def test_drift_names_the_changed_packages(container):
    """Last in the module: it uninstalls a package from the shared container."""
    done = _docker("exec", container, "sh", "-c", 'echo "$GRPO_STACK_IMAGE" && python -m images.fingerprint drift',
                   check=False)
    assert (done.returncode, done.stdout) == (0, "cpu\n"), done.stdout + done.stderr
    done = _docker("exec", container, "sh", "-c",
                   "python -m pip uninstall -q -y tqdm && python -m images.fingerprint drift", check=False)
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["tqdm: locked 4.70.1, not installed", "tqdm: removed after the build (was 4.70.1)"]
