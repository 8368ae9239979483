"""The in-image runtime: one command running an entry point inside a built image, with docker, podman or buildah.

What a run needs from its container is said once, in `Needs` (GPUs, mounts, allowed environment, the command), and
each runtime turns it into its own flags: `--ipc=host` (NCCL and torch's shared memory), memlock and stack ulimits,
host networking (multi-node NCCL/Ray), mounts read-only where only read, the calling user as the process's user so
what it writes is the caller's, and environment passed through by an explicit allow-list only — docker and podman
take `-e NAME` (the value never appears in the command), buildah `--env NAME=value`; nothing else of the host's
environment reaches the container. Knows nothing of training: `trainer.in_image` fills `Needs` from a recipe.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from images.backends import Backend, docker_backend
from images.common import LOCKS_DIR, UsageError, sha256_text
from images.render import LABEL_PREFIX, tag

ALLOWED_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
               "HF_DATASETS_OFFLINE", "HF_TOKEN", "RAY_ADDRESS", "OMP_NUM_THREADS", "SOURCE_DATE_EPOCH")
ALLOWED_PREFIXES = ("NCCL_", "CUDA_", "TORCH_NCCL_", "GLOO_")
STACK = 64 << 20  # 64 MiB stacks and unlimited locked memory (pinned buffers for NCCL/RDMA), as NGC asks
HOME = "/tmp"  # the calling user has no home inside the image
# nor an account: torch.compile (inductor's cache directory, torch < 2.7) asks getpass.getuser(), which without
# one raises unless the environment names the user
USER = "grpo"


@dataclass(frozen=True)
class Mount:
    host: Path
    target: Path
    read_only: bool = True

    def spec(self) -> str:
        return f"{self.host}:{self.target}" + (":ro" if self.read_only else "")


@dataclass
class Needs:
    image: str
    command: list[str]
    gpus: int = 0
    """0: none; else the count (docker `--gpus N`; podman and buildah take every GPU through CDI)."""
    mounts: list[Mount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Fixed variables set inside (not secret: they appear in the command)."""
    workdir: Path | None = None


def ulimits() -> list[str]:
    """memlock unlimited and 64 MiB stacks, or as high as this host lets them go: a runtime cannot raise a limit
    past the hard limit of a caller without CAP_SYS_RESOURCE (an unprivileged container: the run fails to start)."""
    return [_limit("memlock", resource.RLIMIT_MEMLOCK, resource.RLIM_INFINITY),
            _limit("stack", resource.RLIMIT_STACK, STACK)]


def _limit(name: str, which: int, want: int) -> str:
    soft, hard = resource.getrlimit(which)
    value = want
    if hard != resource.RLIM_INFINITY and (want == resource.RLIM_INFINITY or want > hard):
        try:
            resource.setrlimit(which, (soft, want))  # raising this process's own hard limit: the same privilege
        except (ValueError, OSError):
            value = hard
    text = "-1" if value == resource.RLIM_INFINITY else str(value)
    return f"--ulimit={name}={text}:{text}"


def allowed_env(environ: dict[str, str]) -> list[str]:
    """The host variables that may enter the container (allow-list), in a stable order."""
    return sorted(k for k in environ if k in ALLOWED_ENV or k.startswith(ALLOWED_PREFIXES))


def find(name: str | None) -> Backend:
    """The named runtime, else the first usable one: docker (an engine answering), podman, buildah (daemonless)."""
    order = ("docker", "podman", "buildah")
    if name is not None and name not in order:
        raise UsageError(f"--runtime {name!r}: valid runtimes: {', '.join(order)}")
    for candidate in [name] if name else order:
        backend = docker_backend() if candidate == "docker" else Backend(candidate, "vfs")
        try:
            backend.check_usable()
        except UsageError as exc:
            if name:
                raise UsageError(str(exc).replace("--backend", "--runtime")) from None
            continue
        return backend
    raise UsageError(f"--in-image: no usable container runtime; valid: {', '.join(order)} "
                     "(e.g. `apt-get install buildah`, or start dockerd)")


def check_built(backend: Backend, image: str, locks: Path = LOCKS_DIR) -> dict:
    """The image's labels; refuses an image not built, or built from another lock than the one here now."""
    done = subprocess.run(backend.inspect(tag(image)), capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"image {image} ({tag(image)}) is not built for {backend.name}; build it with "
                         f"`nox -s build -- {image} --backend {backend.name}`")
    info = json.loads(done.stdout)
    info = info[0] if isinstance(info, list) else info
    config = info.get("OCIv1", {}).get("config") or info.get("Config") or {}
    labels = config.get("Labels") or {}
    lock = locks / f"{image}.lock.txt"
    built_from, here = labels.get(f"{LABEL_PREFIX}.lock-hash"), sha256_text(lock.read_text())
    if built_from != here:
        raise UsageError(f"image {image} was built from another lock ({built_from}) than {lock} ({here}); rebuild "
                         f"it with `nox -s build -- {image} --backend {backend.name}`")
    return labels


def _user() -> str:
    return f"{os.getuid()}:{os.getgid()}"


def commands(backend: Backend, needs: Needs, environ: dict[str, str]) -> list[list[str]]:
    """The argv(s) that run ``needs.command`` in the image: one `run` for docker/podman; for buildah a
    container from the image, the run, and its removal (`buildah run` runs in an existing container)."""
    passed = allowed_env(environ)
    fixed = {"HOME": HOME, "USER": USER, **needs.env}
    if backend.name in ("docker", "podman"):
        cmd = backend._tool() + ["run", "--rm", "--user", _user(), "--ipc=host", "--network=host"]
        cmd += ulimits()
        if needs.gpus and backend.name == "docker":
            gpus, passed = _docker_gpus(needs.gpus, environ, passed)
            cmd += gpus
        elif needs.gpus:
            cmd += ["--device", "nvidia.com/gpu=all"]  # every GPU under its host index: CUDA_VISIBLE_DEVICES holds
        for m in needs.mounts:
            cmd += ["-v", m.spec()]
        for k, v in fixed.items():
            cmd += ["-e", f"{k}={v}"]
        for k in passed:
            cmd += ["-e", k]  # the value comes from this process's environment, never from the command line
        if needs.workdir:
            cmd += ["-w", str(needs.workdir)]
        return [cmd + [tag(needs.image), *needs.command]]
    ctr = f"grpo-stack-run-{os.getpid()}"
    create = backend._tool() + ["from", "--pull=never", "--name", ctr] + ulimits()
    if needs.gpus:
        create += ["--device", "nvidia.com/gpu=all"]
    run = backend._tool() + ["run", "--isolation", "chroot", "--user", _user(), "--ipc", "host", "--network", "host"]
    for m in needs.mounts:
        run += ["-v", m.spec()]
    for k, v in {**fixed, **{k: environ[k] for k in passed}}.items():
        run += ["--env", f"{k}={v}"]
    if needs.workdir:
        run += ["--workingdir", str(needs.workdir)]
    return [create + [tag(needs.image)], run + [ctr, "--", *needs.command], backend._tool() + ["rm", ctr]]


def _docker_gpus(count: int, environ: dict[str, str], passed: list[str]) -> tuple[list[str], list[str]]:
    """docker's GPU flag, and the variables still passed. `--gpus N` exposes the host's first N GPUs, renumbered
    from 0, where a host CUDA_VISIBLE_DEVICES (host indices) would then hide or mismatch them: the GPUs it names
    are exposed instead (renumbered from 0, all visible inside) and it stays outside."""
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return ["--gpus", str(count)], passed
    return ["--gpus", f'"device={visible}"'], [k for k in passed if k != "CUDA_VISIBLE_DEVICES"]


def shown(argv: list[str], environ: dict[str, str]) -> str:
    """An argv for `--dry-run`: exact, except allow-listed values (buildah's `--env K=V`) shown as `$K`."""
    import shlex

    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        out.append(f"{key}=${key}" if "=" in a and key in allowed_env(environ) and a == f"{key}={environ[key]}"
                   else a)
    return shlex.join(out)


def run(backend: Backend, needs: Needs, environ: dict[str, str]) -> int:
    """Run the command(s); a buildah container is removed whatever the outcome. Returns the entry point's code."""
    cmds = commands(backend, needs, environ)
    if backend.name != "buildah":
        return subprocess.run(cmds[0], env=environ).returncode
    create, work, remove = cmds
    done = subprocess.run(create, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"buildah from {tag(needs.image)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    try:
        return subprocess.run(work).returncode
    finally:
        subprocess.run(remove, capture_output=True)
