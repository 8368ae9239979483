"""Benchmark suites in the matrix: strict keys, names that resolve, a steady window, unique entry names."""

import pytest

from matrix import MatrixError, load_matrix

SUITE = "  cpu:\n    description: \"Tiny recipes × CPU layouts, plus one compute-bound dense model for MFU\"\n"


def test_committed_cpu_suite_expands_to_entries_and_layouts(matrix_text, tmp_path):
    m = load_matrix()
    cpu = m.benchmarks["cpu"]
    assert cpu.layouts == ["single", "dp2", "tp2", "pp2", "cp2"]
    entries = {entry.label: entry for entry in cpu.entries()}
    assert list(entries) == ["tiny-qwen2.5", "tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next", "dense-512",
                             "tiny-qwen3-fsdp"]
    dense = entries["dense-512"]
    assert (dense.recipe, dense.overrides, dense.layouts) == ("tiny-qwen2.5", {"model": "bench-dense-512"}, None)
    assert entries["tiny-qwen3-next"].layouts == ["single", "ep2", "tp2-sp"]
    assert m.models["bench-dense-512"].shape.hidden >= 512


@pytest.mark.parametrize(("old", "new", "path", "words"), [
    ("    layouts: [single, dp2, tp2, pp2, cp2]\n", "    layouts: [single, dp3]\n", "benchmarks.cpu.layouts[1]",
     "'dp3' is not a layout"),
    ("      - {recipe: tiny-qwen2.5, name: dense-512,", "      - {recipe: tiny-qwen9, name: dense-512,",
     "benchmarks.cpu.recipes[4].recipe", "'tiny-qwen9' is not a recipe"),
    ("{recipe: tiny-qwen3-next, layouts: [single, ep2, tp2-sp]}", "{recipe: tiny-qwen3-next, layouts: [single, ep4]}",
     "benchmarks.cpu.recipes[3].layouts[1]", "'ep4' is not a layout"),
    ("    repeats: 2\n", "    repeats: 2\n    repeat: 3\n", "benchmarks.cpu.repeat", "unknown key 'repeat'"),
    ("    warmup_episodes: 1\n    repeats: 2\n", "    warmup_episodes: 4\n    repeats: 2\n",
     "benchmarks.cpu.warmup_episodes", "4 leaves no steady episode of episodes=4; use at most 3"),
    ("      - tiny-qwen2.5\n      - tiny-qwen3\n", "      - tiny-qwen3\n      - tiny-qwen3\n",
     "benchmarks.cpu.recipes[1]", "'tiny-qwen3' appears twice"),
])
def test_bad_suite_is_reported_at_its_path(tmp_path, matrix_text, old, new, path, words):
    assert SUITE in matrix_text and old in matrix_text
    bad = tmp_path / "matrix.yaml"
    bad.write_text(matrix_text.replace(old, new, 1))
    with pytest.raises(MatrixError) as caught:
        load_matrix(bad)
    assert any(p.path == path and words in p.message for p in caught.value.problems), \
        [str(p) for p in caught.value.problems]
