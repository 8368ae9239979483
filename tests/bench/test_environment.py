"""The environment record: revision and dirty flag of the checkout, hashes, the image the bench runs in."""

import hashlib
import subprocess

from bench.environment import capture


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_revision_dirty_flag_hashes_and_image(tmp_path, monkeypatch):
    (tmp_path / "images" / "locks").mkdir(parents=True)
    (tmp_path / "images" / "locks" / "cpu.lock.txt").write_text("torch==2.13.0\n")
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("images: {}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "x")
    monkeypatch.setenv("GRPO_STACK_IMAGE", "cpu")
    env = capture(tmp_path, matrix)
    assert env["git"]["dirty"] is False and len(env["git"]["revision"]) == 40
    assert env["matrix_sha256"] == hashlib.sha256(b"images: {}\n").hexdigest()
    assert env["locks_sha256"] == {"cpu.lock.txt": hashlib.sha256(b"torch==2.13.0\n").hexdigest()}
    assert env["image"]["name"] == "cpu"
    assert env["versions"]["transformer-engine"] is None  # absent here, recorded as such
    matrix.write_text("images: {x: 1}\n")
    assert capture(tmp_path, matrix)["git"]["dirty"] is True
