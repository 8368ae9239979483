"""Patches apply by content to a copy of their target, and refuse when the target text is absent.

The mechanism is exercised with the seed's stack-B megatron MLA patch (kept as test data: no image applies it,
see README "Images"), whose target is a plain one-line edit in a known file.
"""

from __future__ import annotations

import pytest

from images import patching
from images.common import PATCHES_DIR

from .conftest import DATA

MLA = DATA / "megatron-mla-down-proj.patch"
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


@pytest.mark.parametrize("patch, target, excerpt", [
    ("sglang-memory-pool", "sglang/srt/mem_cache/memory_pool.py", "sglang_memory_pool_excerpt.py.txt"),
    ("sglang-model-runner-memory-saver", "sglang/srt/model_executor/model_runner.py",
     "sglang_model_runner_excerpt.py.txt"),
])
def test_sglang_memory_saver_patches_apply_to_0_5_2(tmp_path, patch, target, excerpt):
    file = tmp_path / target
    file.parent.mkdir(parents=True)
    before = (DATA / excerpt).read_text()
    file.write_text(before)
    patching.apply(PATCHES_DIR / f"{patch}.patch", tmp_path)
    after = file.read_text()
    assert "enable_memory_saver=False" not in after
    if patch == "sglang-memory-pool":  # passed on to MambaPool and to the full-attention pool
        passed = "enable_memory_saver=enable_memory_saver"
        assert after.count(passed) == before.count(passed) + 2
        assert "with memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):\n            conv_state = torch.zeros(" in after
    else:
        assert "                    enable_memory_saver=self.server_args.enable_memory_saver,\n                )" in after


def test_standalone_entry_point_reports_failure(site, capsys):
    """The image runs patching.py as a script; a failed hunk must fail the RUN step (exit 1)."""
    assert patching.main(["--root", str(site), str(MLA)]) == 0
    assert patching.main(["--root", str(site), str(MLA)]) == 1
    assert "already applied" in capsys.readouterr().err
