"""The `cpu` image really built with buildah (air-gapped base via debootstrap), every layer searched for a dummy
secret passed to the build, a second cold build compared by digest, then the harness and the drift check run in
one container of it. Slow: CI runs it (`apt-get install buildah debootstrap`); skip locally with `-m 'not slow'`.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from images.cli import main
from images.common import BUILD_DIR, LOCKS_DIR, REPO_ROOT, sha256_text
from images.render import tag
from images.runtime import Needs, commands, find

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah not installed (apt-get install buildah)"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="buildah with chroot isolation and debootstrap need root"),
]

BUILDAH = ["buildah", "--storage-driver", "vfs"]
PLANTED = "grpo-planted-" + secrets.token_hex(8)


def train_in_image(runtime: str, runs: Path) -> None:
    """`python -m trainer demo --in-image` on the host: the run directory lands in `runs` owned by the caller, and
    of the host's environment only the allow-list enters (a planted secret does not; WANDB_MODE does)."""
    env = {**os.environ, "MY_SECRET_TOKEN": PLANTED, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "trainer", "demo", "run.episodes=2", "run.warm_start_steps=5",
                           "--runs", str(runs), "--in-image", "--runtime", runtime], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    assert f"run directory: {run_dir}" in done.stdout
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints"):
        assert (run_dir / name).exists(), name
    written = [run_dir, *run_dir.rglob("*")]
    assert {(p.stat().st_uid, p.stat().st_gid) for p in written} == {(os.getuid(), os.getgid())}
    # The same container command with `env` as its entry point shows what the process sees.
    seen = []
    for argv in commands(find(runtime), Needs(image="cpu", command=["env"]), env):
        seen.append(subprocess.run(argv, env=env, capture_output=True, text=True).stdout)
    inside = "".join(seen)
    assert "WANDB_MODE=offline" in inside and "HOME=/tmp" in inside, inside
    assert PLANTED not in inside and "MY_SECRET_TOKEN" not in inside


@pytest.fixture(scope="module", autouse=True)
def private_storage():
    """Every image of this module lives in its own container storage, deleted at the end: with vfs each layer is a
    full copy of the file system (two cold builds take ~20 GB), and a CI machine must not fill up run after run."""
    root = Path(tempfile.mkdtemp(prefix="grpo-buildah-"))
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root / "graph"}"\nrunroot = "{root / "run"}"\n')
    before = os.environ.get("CONTAINERS_STORAGE_CONF")
    os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)
    try:
        yield root
    finally:
        if before is None:
            os.environ.pop("CONTAINERS_STORAGE_CONF", None)
        else:
            os.environ["CONTAINERS_STORAGE_CONF"] = before
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build `cpu` once, with a random string inside a netrc secret and a CA-bundle secret."""
    token = "grpo-secret-" + secrets.token_hex(16)
    folder = tmp_path_factory.mktemp("secrets")
    (folder / "netrc").write_text(f"machine index.invalid login ci password {token}\n")
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    (folder / "ca.pem").write_text(f"# {token}\n" + (host_ca.read_text() if host_ca.is_file() else ""))
    assert main(["render", "cpu"]) == 0
    # Cold (--no-cache), like the second build of test_two_cold_builds_give_one_digest: a layer reused from the cache
    # of an earlier commit keeps that commit's file times. On a fresh CI machine this costs nothing extra.
    assert main(["build", "cpu", "--backend", "buildah", "--no-cache", "--secret", f"netrc={folder / 'netrc'}",
                 "--secret", f"ca.pem={folder / 'ca.pem'}"]) == 0
    return token, json.loads((BUILD_DIR / "images" / "cpu" / "build.json").read_text())


@pytest.fixture(scope="module")
def in_image(built):
    """Run commands in one container of the built image: under vfs each `buildah from` copies the whole image
    (~20 s here), so the tests below share one (the drift test, which uninstalls a package, comes last)."""
    ctr = subprocess.run(BUILDAH + ["from", tag("cpu")], capture_output=True, text=True, check=True).stdout.strip()

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(BUILDAH + ["run", "--isolation", "chroot", ctr, "--", *command],
                              capture_output=True, text=True)

    try:
        yield run
    finally:
        subprocess.run(BUILDAH + ["rm", ctr], capture_output=True)


def test_labels_carry_the_lock_hash(built):
    _, record = built
    lock_hash = sha256_text((LOCKS_DIR / "cpu.lock.txt").read_text())
    assert record["labels"]["io.grpo-stack.lock-hash"] == lock_hash
    assert record["labels"]["org.opencontainers.image.title"] == "grpo-stack-cpu"
    assert record["backend"] == "buildah" and record["size_bytes"] > 0 and record["duration_s"] > 0
    leftover = subprocess.run(BUILDAH + ["inspect", "--type", "image", f"{tag('cpu')}-building"], capture_output=True)
    assert leftover.returncode != 0, "the temporary build tag must be gone"


def _blobs(layout: Path):
    for blob in sorted((layout / "blobs" / "sha256").iterdir()):
        data = blob.read_bytes()
        yield blob.name, gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_no_layer_holds_the_secret(built, tmp_path):
    token, record = built
    layout = tmp_path / "oci"
    subprocess.run(BUILDAH + ["push", tag("cpu"), f"oci:{layout}"], capture_output=True, check=True)
    blobs = dict(_blobs(layout))
    # The scan must be able to see content: the lock hash label is in the config blob, the harness in a layer.
    assert any(record["labels"]["io.grpo-stack.lock-hash"].encode() in b for b in blobs.values())
    assert any(b"grpo-stack/matrix.yaml" in b or b"opt/grpo-stack/matrix.yaml" in b for b in blobs.values())
    leaked = [name for name, data in blobs.items() if token.encode() in data]
    assert leaked == [], f"secret found in blobs {leaked}"


def test_two_cold_builds_give_one_digest(built):
    """A second build with every layer rebuilt gives the same digest; on a mismatch the differing files are named."""
    from images.backends import Backend
    from images.reproducible import differing_files

    _, first = built
    keep = f"{tag('cpu')}-first"
    subprocess.run(BUILDAH + ["tag", tag("cpu"), keep], check=True, capture_output=True)
    try:
        assert main(["build", "cpu", "--backend", "buildah", "--no-cache"]) == 0
        second = json.loads((BUILD_DIR / "images" / "cpu" / "build.json").read_text())
        if second["digest"] != first["digest"]:
            diff = differing_files(Backend("buildah", "vfs"), keep, tag("cpu"))
            pytest.fail(f"digests {first['digest']} and {second['digest']} differ in {len(diff)} files:\n"
                        + "\n".join(diff[:50]))
    finally:
        subprocess.run(BUILDAH + ["rmi", keep], capture_output=True)


def test_harness_runs_inside(in_image):
    done = in_image("python", "-m", "matrix")
    assert done.returncode == 0, done.stderr
    assert "matrix.yaml: valid" in done.stdout
    torch = in_image("python", "-c", "import torch; print(torch.__version__)")
    assert torch.stdout.strip() == "2.13.0+cpu"


def test_demo_trains_in_image_through_the_trainer(built, tmp_path):
    train_in_image("buildah", tmp_path / "runs")


def test_image_names_itself_and_shows_no_drift(in_image):
    done = in_image("python", "-c", "import os; from trainer.preflight import IMAGE_ENV; print(os.environ[IMAGE_ENV])")
    assert done.stdout.strip() == "cpu", done.stderr
    done = in_image("python", "-m", "images.fingerprint", "drift")
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr


def test_drift_names_the_changed_packages(in_image):
    done = in_image("sh", "-c", "python -m pip uninstall -q -y tqdm && python -m images.fingerprint drift")
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["tqdm: locked 4.70.1, not installed", "tqdm: removed after the build (was 4.70.1)"]
