"""Build backends (buildah, podman, docker) behind one small interface: each method returns an argv.

`--dry-run` prints these argvs, so what it shows is exactly what a real build runs. A real build first asks
`check_usable()`, which refuses in one line a backend that cannot build here (no client, no engine answering).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from images.common import UsageError

BACKENDS = ("buildah", "podman", "docker")


@dataclass(frozen=True)
class Backend:
    name: str
    storage_driver: str | None = None
    """buildah/podman storage driver; vfs works in any container (overlay needs kernel support)."""
    client: str = "docker"
    """The docker client every docker command runs (the fallback's pre-23 client builds, tags and inspects)."""
    docker_build: tuple[str, ...] = ("docker", "buildx", "build", "--load")
    """How docker builds: buildx, or without its plugin a pre-23 client with the engine's BuildKit."""
    note: str | None = None
    """Said once before building (the docker fallback)."""
    unusable: str | None = None
    """Why this backend cannot build here; `--dry-run` still prints its commands."""

    def _tool(self) -> list[str]:
        if self.name == "docker":
            return [self.client]
        return [self.name] + (["--storage-driver", self.storage_driver] if self.storage_driver else [])

    def check_usable(self) -> None:
        """Refuse in one line a backend that cannot build: no client, or no Docker engine answering."""
        if self.unusable:
            raise UsageError(self.unusable)
        tool = self._tool()[0]
        if shutil.which(tool) is None:
            raise UsageError(f"--backend {self.name}: `{tool}` is not installed "
                             f"(e.g. `apt-get install {'docker.io' if self.name == 'docker' else self.name}`)")
        if self.name == "docker":
            try:
                done = subprocess.run([tool, "version"], capture_output=True, text=True, timeout=30)
                why = (done.stderr.strip().splitlines() or [""])[-1] if done.returncode else None
            except subprocess.TimeoutExpired:
                why = "no answer in 30 s"
            if why is not None:
                host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
                raise UsageError(f"--backend docker: no Docker engine answers at {host} ({why}); start dockerd "
                                 "or point DOCKER_HOST at one")

    def build(self, dockerfile: Path, context: Path, tag: str, *, args: dict[str, str], secrets: dict[str, Path],
              volumes: dict[Path, str], epoch: int, iidfile: Path, cache: bool = True) -> list[str]:
        if volumes and self.name == "docker":
            raise ValueError("docker builds take wheelhouses through the build context, not volumes")
        cmd = (list(self.docker_build) if self.name == "docker" else
               self._tool() + (["bud", "--isolation", "chroot", "--timestamp", str(epoch), "--layers"]
                               if self.name == "buildah" else ["build"]))
        if not cache:
            cmd.append("--no-cache")
        cmd += ["-f", str(dockerfile), "-t", tag, "--iidfile", str(iidfile)]
        for key, value in args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        for key, path in secrets.items():
            cmd += ["--secret", f"id={key},src={path}"]
        for host, target in volumes.items():
            cmd += ["-v", f"{host}:{target}:ro"]
        return cmd + [str(context)]

    def exists(self, ref: str) -> list[str]:
        return self._tool() + (["image", "inspect", ref] if self.name == "docker" else
                               ["inspect", "--type", "image", ref] if self.name == "buildah" else
                               ["image", "exists", ref])

    def pull(self, ref: str) -> list[str]:
        return self._tool() + ["pull", ref]

    def tag(self, ref: str, new: str) -> list[str]:
        return self._tool() + ["tag", ref, new]

    def remove(self, ref: str) -> list[str]:
        return self._tool() + ["rmi", ref]

    def inspect(self, ref: str) -> list[str]:
        return self._tool() + (["inspect", "--type", "image", ref] if self.name == "buildah" else
                               ["image", "inspect", ref])

    def import_rootfs(self, tar: Path, tag: str) -> list[list[str]]:
        """Commands turning a rootfs tarball into a local image (buildah has no `import`)."""
        if self.name != "buildah":
            return [self._tool() + ["import", str(tar), tag]]
        ctr = "grpo-stack-bootstrap"
        return [self._tool() + ["from", "--name", ctr, "scratch"], self._tool() + ["add", ctr, str(tar), "/"],
                self._tool() + ["commit", "--rm", ctr, tag]]


def _client_major(docker: str) -> int:
    out = subprocess.run([docker, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.", out)
    return int(found.group(1)) if found else 0


def docker_backend() -> Backend:
    """docker with buildx when its plugin answers; else the first docker client older than 23 (Debian's 20.10),
    whose `build` uses the engine's BuildKit under DOCKER_BUILDKIT=1 (secret mounts included); newer clients
    need buildx for BuildKit."""
    buildx = Backend("docker")
    if shutil.which("docker") is not None and \
            subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return buildx
    folders = [*os.environ.get("PATH", "").split(":"), "/usr/bin"]
    clients = [str(Path(f) / "docker") for f in folders if f and (Path(f) / "docker").is_file()]
    for client in dict.fromkeys(clients):
        major = _client_major(client)
        if 0 < major < 23:
            return Backend("docker", client=client, docker_build=("env", "DOCKER_BUILDKIT=1", client, "build"),
                           note=f"docker buildx is not installed: building with {client} (client {major}.x) and "
                                "the engine's BuildKit (DOCKER_BUILDKIT=1)")
    if not clients:
        return replace(buildx, unusable="--backend docker: no `docker` client is installed "
                                        "(e.g. `apt-get install docker.io`)")
    return replace(buildx, unusable="--backend docker: `docker buildx` is not installed and no docker client older "
                                    "than 23 is on PATH (newer ones build only through buildx); install the buildx "
                                    "plugin or Debian's docker.io")


def pick(name: str | None, storage_driver: str | None) -> Backend:
    """The named backend, or the first one installed (buildah, podman, docker)."""
    if name == "docker" or (name is None and not any(shutil.which(c) for c in BACKENDS[:2])
                            and shutil.which("docker")):
        return docker_backend()
    if name:
        return Backend(name, storage_driver)
    for candidate in BACKENDS[:2]:
        if shutil.which(candidate):
            return Backend(candidate, storage_driver)
    raise UsageError(f"--backend: none installed; valid backends: {', '.join(BACKENDS)} "
                     "(e.g. `apt-get install buildah`)")
