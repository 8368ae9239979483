"""Build backends (buildah, podman, docker) behind one small interface: each method returns an argv.

`--dry-run` prints these argvs, so what it shows is exactly what a real build runs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from images.common import UsageError

BACKENDS = ("buildah", "podman", "docker")


@dataclass(frozen=True)
class Backend:
    name: str
    storage_driver: str | None = None
    """buildah/podman storage driver; vfs works in any container (overlay needs kernel support)."""

    def _tool(self) -> list[str]:
        if self.name == "docker":
            return ["docker"]
        return [self.name] + (["--storage-driver", self.storage_driver] if self.storage_driver else [])

    def build(self, dockerfile: Path, context: Path, tag: str, *, args: dict[str, str], secrets: dict[str, Path],
              volumes: dict[Path, str], epoch: int, iidfile: Path, cache: bool = True) -> list[str]:
        if volumes and self.name == "docker":
            raise UsageError("--backend docker: `docker build` cannot bind-mount a wheelhouse; valid backends for "
                             "a wheelhouse: buildah, podman (or pass --no-host-pip without --wheelhouse)")
        cmd = self._tool() + (["buildx", "build", "--load"] if self.name == "docker" else
                              ["bud", "--isolation", "chroot", "--timestamp", str(epoch), "--layers"]
                              if self.name == "buildah" else ["build"])
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


def pick(name: str | None, storage_driver: str | None) -> Backend:
    """The named backend, or the first one installed (buildah, podman, docker)."""
    if name:
        return Backend(name, storage_driver if name != "docker" else None)
    for candidate in BACKENDS:
        if shutil.which(candidate):
            return Backend(candidate, storage_driver if candidate != "docker" else None)
    raise UsageError(f"--backend: none installed; valid backends: {', '.join(BACKENDS)} "
                     "(e.g. `apt-get install buildah`)")
