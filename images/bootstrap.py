"""Air-gapped bases: a base that cannot be pulled but is declared bootstrappable (a Debian suite) is built
locally with debootstrap, imported as a local image, and cached (tarball under build/bootstrap/, plus the
local image itself) so a second build reuses it.
"""

from __future__ import annotations

from pathlib import Path

from images.backends import Backend
from images.common import BUILD_DIR
from matrix.schema import Image

CACHE = BUILD_DIR / "bootstrap"


def rootfs_tar(image: Image) -> Path:
    b = image.base.bootstrap
    return CACHE / f"{b.suite}-{b.variant}.tar"


def commands(image: Image, backend: Backend, tag: str, *, have_tar: bool) -> list[list[str]]:
    """debootstrap → tarball (skipped when cached) → local image `tag`."""
    b, tar = image.base.bootstrap, rootfs_tar(image)
    rootfs = CACHE / f"{b.suite}-{b.variant}.rootfs"
    make = [["rm", "-rf", str(rootfs)],
            ["debootstrap", f"--variant={b.variant}", b.suite, str(rootfs)],
            # The downloaded .debs are not part of a base; dropping them keeps the layer ~40% smaller.
            ["find", f"{rootfs}/var/cache/apt/archives", "-name", "*.deb", "-delete"],
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", f"{tar}.tmp", "."],
            ["mv", f"{tar}.tmp", str(tar)],
            ["rm", "-rf", str(rootfs)]]
    return ([] if have_tar else make) + backend.import_rootfs(tar, tag)
