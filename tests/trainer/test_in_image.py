"""`python -m trainer RECIPE --in-image`: the exact container command (`--dry-run`) for docker, podman and buildah,
and refusals in seconds, before any container starts (too few GPUs, weights not prepared, image not built). The
real run inside the built `cpu` image is in tests/images/test_build_cpu_slow.py (buildah) and
test_build_docker_slow.py (docker), where that image is built anyway."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import yaml

from images.runtime import ulimits
from trainer.cli import main
from trainer.prepare.places import ROOT

SECRET = "planted-secret-value"


@pytest.fixture
def host_env(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-value")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("MY_SECRET_TOKEN", SECRET)


def test_ulimits_are_memlock_and_64_mib_stacks():
    memlock, stack = ulimits()
    assert memlock.startswith("--ulimit=memlock=") and stack == "--ulimit=stack=67108864:67108864"


def dry(capsys, *args: str) -> str:
    assert main([*args, "--in-image", "--dry-run"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_moonlight_dry_run_carries_gpu_ipc_ulimit_mount_env_flags(runtime, host_env, capsys):
    out = dry(capsys, "moonlight", "--runtime", runtime).strip()
    assert out.count("\n") == 0 and f"{runtime} " in out and " run --rm --user " in out
    gpu = "--gpus 8" if runtime == "docker" else "--device nvidia.com/gpu=all"
    for flag in (gpu, "--ipc=host", "--network=host", *ulimits(),
                 f"--user {os.getuid()}:{os.getgid()}", "-e WANDB_API_KEY", "-e NCCL_DEBUG", "-e HOME=/tmp"):
        assert flag in out, flag
    weights = ROOT / "prepared" / "moonlight-16b-a3b" / "mcore-moonlight-8"
    assert f"-v {weights}:{weights}:ro" in out and f"model.weights={weights}" in out
    data = ROOT / "data" / "math-lighteval"
    assert f"-v {data}:{data}:ro" in out and f"-v {ROOT / 'runs'}:{ROOT / 'runs'} " in out  # runs: read-write
    assert "MY_SECRET_TOKEN" not in out and SECRET not in out and "wandb-key-value" not in out
    assert out.endswith(f"grpo-stack/vllm-te27:0.1.0 python -m trainer moonlight model.weights={weights} "
                        f"data.path={data / 'train.parquet'} --matrix {ROOT / 'matrix.yaml'} --runs {ROOT / 'runs'}")


def test_buildah_dry_run_runs_in_a_container_it_removes(host_env, capsys):
    lines = dry(capsys, "demo", "run.episodes=2", "--runtime", "buildah").strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("buildah --storage-driver vfs from --pull=never --name grpo-stack-run-")
    assert " ".join(ulimits()) in lines[0] and "nvidia.com/gpu" not in lines[0]  # a CPU recipe: no GPUs
    assert " run --isolation chroot " in lines[1] and "--ipc host" in lines[1]
    assert "--env 'WANDB_API_KEY=$WANDB_API_KEY'" in lines[1] and "MY_SECRET" not in lines[1]
    assert lines[1].endswith(f"-- python -m trainer demo run.episodes=2 --matrix {ROOT / 'matrix.yaml'} "
                             f"--runs {ROOT / 'runs'}")
    assert lines[2].startswith("buildah --storage-driver vfs rm grpo-stack-run-")


def refused(capsys, *args: str) -> str:
    started = time.monotonic()
    assert main([*args, "--in-image"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_too_few_gpus_is_refused_in_seconds(capsys):
    assert refused(capsys, "moonlight") == "error: recipe moonlight needs 8 GPUs (layout moonlight-8), this machine has 0"


def test_weights_not_prepared_are_refused_in_seconds(capsys, tmp_path):
    data = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    data["prepared"] = str(tmp_path / "prepared")
    data["models"]["tiny-qwen2.5"]["hf_id"] = "test-org/tiny-qwen2.5"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    err = refused(capsys, "demo", "--matrix", str(tmp_path / "m.yaml"))
    assert err == "error: weights of test-org/tiny-qwen2.5 are not prepared; run `nox -s prepare -- demo`"


@pytest.mark.skipif(shutil.which("buildah") is None or os.geteuid() != 0, reason="buildah (as root) not installed")
def test_an_image_not_built_is_refused_in_seconds(capsys, tmp_path, monkeypatch):
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path / "g"}"\nrunroot = "{tmp_path / "r"}"\n')
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    err = refused(capsys, "demo", "--runtime", "buildah")
    assert err == ("error: image cpu (grpo-stack/cpu:0.1.0) is not built for buildah; build it with "
                   "`nox -s build -- cpu --backend buildah`")


def test_equivalence_in_image_runs_the_same_gates_inside_their_image(host_env, capsys):
    """Equivalence through the same machinery: the gates' image, verdicts and cache written as the caller."""
    from trainer.equivalence.run import main as equivalence

    out = ROOT / "runs" / "gates"
    assert equivalence(["tp-equivalence", "--candidate", "1", "--in-image", "--dry-run", "--runtime", "docker"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("docker run --rm --user ") and "--gpus" not in line  # a CPU gate: no GPUs
    for flag in ("--ipc=host", *ulimits(), f"-v {ROOT / 'matrix.yaml'}:{ROOT / 'matrix.yaml'}:ro",
                 f"-v {out}:{out} ", "-e WANDB_API_KEY", "-e NCCL_DEBUG"):
        assert flag in line, flag
    assert "MY_SECRET_TOKEN" not in line and SECRET not in line
    assert line.endswith(f"grpo-stack/cpu:0.1.0 python -m trainer.equivalence tp-equivalence --matrix "
                         f"{ROOT / 'matrix.yaml'} --out {out} --candidate=1")
    # the gates' ranks on a Ray cluster: the launcher and the cluster reach the command inside
    assert equivalence(["tp-equivalence", "--in-image", "--dry-run", "--runtime", "docker", "--launcher", "ray",
                        "--ray-address", "10.0.0.1:6379"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"--out {out} --launcher ray --ray-address 10.0.0.1:6379")


def test_bench_in_image_runs_the_same_suite_inside_its_image(host_env, capsys):
    from bench.cli import main as bench

    assert bench(["run", "demo-cpu", "--in-image", "--dry-run", "--runtime", "podman"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    results, runs = ROOT / "bench" / "results", ROOT / "runs" / "bench"
    assert line.startswith("podman --storage-driver vfs run --rm --user ") and "nvidia.com/gpu" not in line
    assert f"-v {results}:{results} " in line and f"-v {runs}:{runs} " in line and SECRET not in line
    assert line.endswith(f"grpo-stack/cpu:0.1.0 python -m bench run demo-cpu --matrix {ROOT / 'matrix.yaml'} --results "
                         f"{results} --runs {runs} --timeout 1800")


def test_a_gate_on_prepared_weights_is_refused_in_image_in_seconds(capsys, tmp_path):
    """Prepared weights reach a container only as the train command's overrides: a gate of such a recipe is one
    line on the host, not a run that fails inside."""
    from trainer.equivalence.run import main as equivalence

    data = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    model = data["recipes"]["gates-dense"]["model"]
    data["models"][model]["hf_id"] = "test-org/tiny"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert equivalence(["tp-equivalence", "--matrix", str(tmp_path / "m.yaml"), "--in-image", "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("error: --in-image: gate tp-equivalence: recipe gates-dense starts from prepared weights or data, "
                    "which reach a container only through `python -m trainer gates-dense --in-image`; run this gate "
                    "on the host")


def test_a_gate_on_weights_the_matrix_names_mounts_them_read_only(capsys, tmp_path):
    from trainer.equivalence.run import main as equivalence

    data = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    data["models"][data["recipes"]["gates-dense"]["model"]]["weights"] = str(tmp_path / "weights")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    args = ["tp-equivalence", "--matrix", str(tmp_path / "m.yaml"), "--in-image", "--dry-run", "--runtime", "docker"]
    assert equivalence(args) == 0
    assert f"-v {tmp_path / 'weights'}:{tmp_path / 'weights'}:ro " in capsys.readouterr().out


def test_a_ray_driver_in_its_image_passes_the_launcher_and_takes_no_gpus(host_env, capsys):
    """Under --launcher ray the container holds the driver only (its ranks run on the cluster's nodes): the
    launcher and the cluster reach the command inside, and it asks for no GPUs of this host."""
    out = dry(capsys, "moonlight", "--runtime", "docker", "--launcher", "ray", "--ray-address", "10.0.0.1:6379")
    assert out.strip().endswith("--launcher ray --ray-address 10.0.0.1:6379") and "--gpus" not in out
    # nor is this host's GPU count what refuses it
    assert refused(capsys, "moonlight", "--launcher", "ray").startswith("error: weights of moonshotai/")


def test_docker_gets_the_gpus_cuda_visible_devices_names_and_the_container_a_user(host_env, capsys, monkeypatch):
    """`--gpus 8` would expose the host's first GPUs renumbered from 0, where the host's CUDA_VISIBLE_DEVICES
    (host indices) would then hide or mismatch them; torch < 2.7's compile needs a user name (no account)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "8,9,10,11,12,13,14,15")
    out = dry(capsys, "moonlight", "--runtime", "docker")
    assert "--gpus '\"device=8,9,10,11,12,13,14,15\"'" in out and "-e CUDA_VISIBLE_DEVICES" not in out
    assert "-e USER=grpo" in out and "-e HOME=/tmp" in out
    assert "-e CUDA_VISIBLE_DEVICES" in dry(capsys, "moonlight", "--runtime", "podman")  # CDI: host indices
