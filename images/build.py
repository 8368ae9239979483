"""`nox -s build`: build rendered images with buildah, podman or docker, and record what was built.

Secrets (the host's pip settings, CA bundle, index/git credentials in a netrc) reach the build only as build
secrets, written to a private temporary folder outside the context and deleted afterwards; nothing secret is
ever a build argument. A failed build names its step, shows the last log lines and leaves no tag behind.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from images import bootstrap, lockfile
from images.backends import BACKENDS, Backend, pick
from images.common import BUILD_DIR, UsageError, atomic_write, display, matrix_path
from images.hostpip import read_host_pip
from images.render import (
    CA_TARGET,
    bootstrap_tag,
    load_patches,
    problems,
    read_lock,
    refuse_or_warn,
    render_image,
    tag,
)

SECRET_IDS = ("pip.conf", "ca.pem", "netrc")
WHEELHOUSE = "/wheelhouse"
STEP = re.compile(r"^(STEP \d+/\d+: .*|#\d+ \[[^\]]+\] .*)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, help="default: the first installed of buildah, podman, docker")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands, run and write nothing")
    p.add_argument("--storage-driver", default="vfs", help="buildah/podman storage driver (default: vfs)")
    p.add_argument("--bootstrap", choices=("auto", "always", "never"), default="auto",
                   help="build a bootstrappable base locally: when it cannot be pulled (auto), always, or never")
    p.add_argument("--secret", action="append", default=[], metavar="ID=FILE",
                   help=f"a build secret, ID one of {', '.join(SECRET_IDS)} (netrc: index or git credentials)")
    p.add_argument("--wheelhouse", action="append", default=[], metavar="DIR",
                   help="local wheels mounted read-only (default: the host pip's find-links folders)")
    p.add_argument("--no-host-pip", action="store_true", help="do not pass the host's pip settings through")
    p.add_argument("--allow-unpinned", action="store_true",
                   help="development: build despite a base without digest, moving source refs or patch slots")
    p.add_argument("--no-cache", action="store_true", help="rebuild every layer (a cold build; reproducibility)")


def _secrets(given: list[str]) -> dict[str, Path]:
    out = {}
    for item in given:
        key, _, path = item.partition("=")
        if key not in SECRET_IDS or not path:
            raise UsageError(f"--secret {item!r}: expected ID=FILE with ID one of {', '.join(SECRET_IDS)}")
        if not Path(path).is_file():
            raise UsageError(f"--secret {key}: {path} is not a file")
        out[key] = Path(path)
    return out


def pip_conf(index_url: str | None, find_links: list[str], has_ca: bool) -> str:
    """The build's pip.conf: the host's index and CA, its wheelhouses where the build sees them."""
    lines = ["[global]"]
    if index_url:
        lines.append(f"index-url = {index_url}")
    if find_links:
        lines.append("find-links = " + " ".join(find_links))
    if has_ca:
        lines.append(f"cert = {CA_TARGET}")
    return "\n".join(lines) + "\n"


def stage_wheelhouses(wheelhouses: list[Path], context: Path) -> list[str]:
    """Hard-link (else copy) the wheels the image's lock names into `context/wheelhouse/`; their find-links
    inside the build. Every pip step bind-mounts the context, and no COPY takes this folder into a layer."""
    pins = {(lockfile.normalize(p.name), p.version) for p in lockfile.parse((context / "lock.txt").read_text()).values()}
    folder = context / "wheelhouse"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for wheelhouse in wheelhouses:
        for wheel in sorted(wheelhouse.glob("*.whl")):
            name, version = wheel.name.split("-")[:2]
            if (lockfile.normalize(name), version) in pins and not (folder / wheel.name).exists():
                try:
                    os.link(wheel, folder / wheel.name)
                except OSError:
                    shutil.copy2(wheel, folder / wheel.name)
    return ["/ctx/wheelhouse"] if any(folder.iterdir()) else []


class Builder:
    """One `nox -s build` invocation: shared settings, then `image()` per image."""

    def __init__(self, matrix, args: argparse.Namespace, console, render_dir: Path):
        self.matrix, self.args, self.console, self.render_dir = matrix, args, console, render_dir
        self.backend: Backend = pick(args.backend, args.storage_driver)
        if not args.dry_run:
            self.backend.check_usable()
        if self.backend.note:
            console.print(f"[yellow]note:[/yellow] {self.backend.note}")
        self.user_secrets = _secrets(args.secret)
        host = read_host_pip(not args.no_host_pip)
        missing = [w for w in args.wheelhouse if not Path(w).is_dir()]
        if missing:
            raise UsageError(f"--wheelhouse: {', '.join(missing)} is not a folder")
        self.wheelhouses = [Path(w) for w in args.wheelhouse] or host.find_links
        bad = [u for u in host.extra_index_urls if "@" in u.split("//", 1)[-1].split("/", 1)[0]]
        if bad:
            raise UsageError(f"host pip extra-index-url {bad[0].split('@')[-1]} carries credentials; build args "
                             "enter the image history, so put them in a netrc and pass --secret netrc=FILE")
        self.host = host

    def run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess | None:
        if self.args.dry_run:
            print("$ " + shlex.join(cmd))
            return None
        return subprocess.run(cmd, capture_output=True, text=True, check=check)

    def base(self, name: str) -> dict[str, str]:
        """Build args choosing the base: the declared one, or a local debootstrap of it."""
        image = self.matrix.images[name]
        ref = f"{image.base.ref}@{image.base.digest}" if image.base.digest else image.base.ref
        mode = self.args.bootstrap if image.base.bootstrap else "never"
        if mode == "never":
            return {}
        local = bootstrap_tag(image)
        if mode == "auto":
            if self.args.dry_run:
                print(f"# if `{shlex.join(self.backend.pull(ref))}` fails, bootstrap the base locally:")
            elif self.run(self.backend.pull(ref), check=False).returncode == 0:
                return {}
        have_image = not self.args.dry_run and self.run(self.backend.exists(local), check=False).returncode == 0
        if not have_image:
            bootstrap.CACHE.mkdir(parents=True, exist_ok=True)
            with self.console.status(f"bootstrapping {local} with debootstrap…"):
                for cmd in bootstrap.commands(image, self.backend, local,
                                              have_tar=bootstrap.rootfs_tar(image).is_file()):
                    self.run(cmd)
        return {"BASE": local}

    def image(self, name: str) -> dict | None:
        image = self.matrix.images[name]
        # Build renders what it builds, so a Dockerfile can never be older than the matrix and lock it is built
        # from (a dry run renders into a temporary folder and shows where the real build puts it).
        rendered = render_image(name, image, self.args.locks, matrix_path(self.args.file), self.render_dir)
        dockerfile = BUILD_DIR / "images" / name / "Dockerfile"
        if self.args.dry_run:
            print(f"# render {display(dockerfile.parent)}/ (Dockerfile and context, as `nox -s render -- {name}`)")
        else:
            self.console.print(f"rendered {display(rendered)}")
        # The epoch the Dockerfile was rendered with (its labels say the same).
        epoch = int(re.search(r"^ARG SOURCE_DATE_EPOCH=(\d+)$", rendered.read_text(), re.M).group(1))
        final, building = tag(name), f"{tag(name)}-building"
        with tempfile.TemporaryDirectory(prefix="grpo-stack-secrets-") as tmp:
            if self.backend.name == "docker" and self.args.dry_run:
                print(f"# the lock's wheels from {' '.join(map(str, self.wheelhouses))} are linked into "
                      "context/wheelhouse/, which every pip step mounts at /ctx/wheelhouse")
                volumes, find_links = {}, ["/ctx/wheelhouse"] if self.wheelhouses else []
            elif self.backend.name == "docker":  # no volumes: the wheels the lock names go in the context
                volumes, find_links = {}, stage_wheelhouses(self.wheelhouses, dockerfile.parent / "context")
            else:
                volumes = {w: f"{WHEELHOUSE}/{i}" for i, w in enumerate(self.wheelhouses)}
                find_links = list(volumes.values())
            secrets = self._write_secrets(Path(tmp), find_links)
            args = {"SOURCE_DATE_EPOCH": str(epoch), **self.base(name)}
            public = " ".join(image.pip.extra_index_urls + self.host.extra_index_urls)
            if self.wheelhouses and image.pip.extra_index_urls:  # the wheelhouse stands in for them (as in lock)
                public = " ".join(self.host.extra_index_urls)
            args["PIP_EXTRA_INDEX_URL"] = public
            iid = dockerfile.parent / "image-id"
            cmd = self.backend.build(dockerfile, dockerfile.parent / "context", building, args=args,
                                     secrets=secrets, volumes=volumes, epoch=epoch, iidfile=iid,
                                     cache=not self.args.no_cache)
            if self.args.dry_run:
                print(f"# secrets are files in a private temporary folder (here {tmp}), deleted after the build")
                for c in (cmd, self.backend.tag(building, final), self.backend.remove(building)):
                    self.run(c)
                return None
            started = time.monotonic()
            if not self._stream(name, cmd, dockerfile.parent / "build.log"):
                self.run(self.backend.remove(building), check=False)
                return None
        self.run(self.backend.tag(building, final))
        self.run(self.backend.remove(building), check=False)
        return self._record(name, final, round(time.monotonic() - started, 1), args)

    def _write_secrets(self, folder: Path, find_links: list[str]) -> dict[str, Path]:
        has_ca = "ca.pem" in self.user_secrets or self.host.cert is not None
        content = {"pip.conf": pip_conf(self.host.index_url, find_links, has_ca), "netrc": "",
                   "ca.pem": self.host.cert.read_text() if self.host.cert else ""}
        out = {}
        for key in SECRET_IDS:
            out[key] = self.user_secrets.get(key) or folder / key
            if key not in self.user_secrets:
                (folder / key).write_text(content[key])
                os.chmod(folder / key, 0o600)
        return out

    def _stream(self, name: str, cmd: list[str], log: Path) -> bool:
        """Run the build with a progress line showing its current step; on failure report step and log tail."""
        tail, step = collections.deque(maxlen=25), "starting"
        columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[image]}[/bold] {task.description}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress, log.open("w") as out:
            task = progress.add_task(step, image=name, total=None)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                out.write(line)
                tail.append(line.rstrip())
                if STEP.match(line):
                    step = line.strip()
                    progress.update(task, description=step[:100])
            proc.wait()
        if proc.returncode == 0:
            return True
        self.console.print(f"[red]✗ {name}: build failed at {step}[/red] (full log: {display(log)})")
        print("\n".join(f"    {line}" for line in tail))
        return False

    def _record(self, name: str, ref: str, seconds: float, args: dict[str, str]) -> dict:
        info = json.loads(self.run(self.backend.inspect(ref)).stdout)
        info = info[0] if isinstance(info, list) else info
        config = info.get("OCIv1", {}).get("config") or info.get("Config") or {}
        labels = config.get("Labels") or {}
        manifest = info.get("Manifest") or {}
        manifest = json.loads(manifest) if isinstance(manifest, str) else manifest  # buildah: a JSON string
        size = info.get("Size") or sum(layer.get("size", 0) for layer in manifest.get("layers", []))
        record = {"image": name, "tag": ref, "backend": self.backend.name,
                  "digest": info.get("FromImageDigest") or info.get("Digest") or (info.get("RepoDigests") or [None])[0],
                  "id": info.get("FromImageID") or info.get("Id"), "size_bytes": size, "duration_s": seconds,
                  "base": args.get("BASE", "pulled"), "labels": labels,
                  "regenerate": f"nox -s build -- {name} --backend {self.backend.name}"}
        path = BUILD_DIR / "images" / name / "build.json"
        atomic_write(path, json.dumps(record, indent=2) + "\n")
        self.console.print(f"[green]✓ {name}[/green]: {ref} in {seconds} s, {size / 1e6:.0f} MB → {display(path)}")
        return record


def build(matrix, names: list[str], args: argparse.Namespace, console) -> int:
    # Every image's pins, patches and lock checked before the first build starts.
    found = [p for n in names for p in problems(n, matrix.images[n], load_patches(n, matrix.images[n]))]
    for n in names:
        read_lock(n, matrix.images[n], args.locks)
    refuse_or_warn(found, args.allow_unpinned, console)
    builder_dir = tempfile.TemporaryDirectory(prefix="grpo-stack-render-") if args.dry_run else None
    try:
        builder = Builder(matrix, args, console, Path(builder_dir.name) if builder_dir else BUILD_DIR / "images")
        failed = [n for n in names if builder.image(n) is None and not args.dry_run]
    finally:
        if builder_dir:
            builder_dir.cleanup()
    return 1 if failed else 0
