"""Patches apply by content to a copy of their target, and refuse when the target text is absent."""

from __future__ import annotations

import pytest

from images import patching
from images.common import PATCHES_DIR

from .conftest import DATA

MLA = PATCHES_DIR / "megatron-mla-down-proj.patch"
TARGET = "megatron/core/models/gpt/gpt_layer_specs.py"


@pytest.fixture
def site(tmp_path):
    """A fake site-packages holding an excerpt of megatron-core 0.14.0's gpt_layer_specs.py."""
    target = tmp_path / TARGET
    target.parent.mkdir(parents=True)
    target.write_text((DATA / "gpt_layer_specs_excerpt.py.txt").read_text())
    return tmp_path


def test_mla_patch_applies_by_content(site):
    before = (site / TARGET).read_text()
    patching.apply(MLA, site)
    after = (site / TARGET).read_text()
    assert "linear_q_down_proj=backend.linear()" in before
    assert "linear_q_down_proj=backend.column_parallel_linear()" in after
    assert "linear_kv_down_proj=backend.column_parallel_linear()" in after
    assert "backend.linear()" not in after
    assert len(after.splitlines()) == len(before.splitlines())


def test_mla_patch_ignores_line_numbers(site):
    target = site / TARGET
    target.write_text("# moved down by three lines\n\n\n" + target.read_text())
    patching.apply(MLA, site)
    assert "linear_kv_down_proj=backend.column_parallel_linear()" in target.read_text()


def test_refuses_when_the_target_line_is_absent(site):
    target = site / TARGET
    target.write_text(target.read_text().replace("linear_kv_down_proj=backend.linear()", "linear_kv_down_proj=x()"))
    with pytest.raises(patching.PatchError, match="target text not found"):
        patching.apply(MLA, site)


def test_refuses_a_second_application(site):
    patching.apply(MLA, site)
    with pytest.raises(patching.PatchError, match="already applied"):
        patching.apply(MLA, site)


def test_refuses_ambiguous_target(site):
    target = site / TARGET
    target.write_text(target.read_text() * 2)
    with pytest.raises(patching.PatchError, match="found 2 times"):
        patching.apply(MLA, site)


def test_sglang_slot_has_no_hunks_and_is_refused(tmp_path):
    slot = PATCHES_DIR / "sglang-memory-pool.patch"
    assert patching.parse(slot.read_text(), "sglang-memory-pool").hunks == []
    assert "SLOT" in slot.read_text()
    with pytest.raises(patching.PatchError, match="slot with no hunks"):
        patching.apply(slot, tmp_path)


def test_standalone_entry_point_reports_failure(site, capsys):
    """The image runs patching.py as a script; a failed hunk must fail the RUN step (exit 1)."""
    assert patching.main(["--root", str(site), str(MLA)]) == 0
    assert patching.main(["--root", str(site), str(MLA)]) == 1
    assert "already applied" in capsys.readouterr().err
