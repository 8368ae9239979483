"""The `cpu` image built with `--backend docker` on a real engine (CI starts one: .ci/run), its labels checked
against the lock and the matrix, every layer searched for a dummy secret, and demo episodes run with `docker run`.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from images.cli import main
from images.common import BUILD_DIR, LOCKS_DIR, image_hash, sha256_text
from images.render import tag
from matrix import load_matrix

from .test_build_cpu_slow import TRAINER_COMMAND


def _engine() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _engine(), reason="no Docker engine answers (CI starts one: see .ci/run)"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    token = "grpo-secret-" + secrets.token_hex(16)
    netrc = tmp_path_factory.mktemp("secrets") / "netrc"
    netrc.write_text(f"machine index.invalid login ci password {token}\n")
    assert main(["render", "cpu"]) == 0
    assert main(["build", "cpu", "--backend", "docker", "--secret", f"netrc={netrc}"]) == 0
    return token, json.loads((BUILD_DIR / "images" / "cpu" / "build.json").read_text())


def test_labels_name_the_lock_and_the_matrix(built):
    _, record = built
    assert record["backend"] == "docker"
    assert record["labels"]["io.grpo-stack.lock-hash"] == sha256_text((LOCKS_DIR / "cpu.lock.txt").read_text())
    assert record["labels"]["io.grpo-stack.matrix-hash"] == image_hash(load_matrix().images["cpu"])


def test_no_layer_holds_the_secret(built, tmp_path):
    token, _ = built
    archive = tmp_path / "cpu.tar"
    subprocess.run(["docker", "save", "-o", str(archive), tag("cpu")], check=True, capture_output=True)
    seen, leaked = 0, []
    with tarfile.open(archive) as outer:
        for member in (m for m in outer if m.isfile() and m.name.endswith(".tar")):
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read())) as layer:
                for f in (f for f in layer if f.isfile()):
                    data = layer.extractfile(f).read()
                    seen += 1
                    if token.encode() in data:
                        leaked.append(f"{member.name}:{f.name}")
    assert seen > 1000 and leaked == []


def test_demo_runs_with_docker_run(built):
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", tag("cpu"), *TRAINER_COMMAND],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "run directory: /tmp/runs/demo-" in done.stdout
    drift = subprocess.run(["docker", "run", "--rm", "--network", "none", tag("cpu"), "python", "-m",
                            "images.fingerprint", "drift"], capture_output=True, text=True)
    assert (drift.returncode, drift.stdout) == (0, "")
    assert Path(BUILD_DIR / "images" / "cpu" / "build.json").is_file()
