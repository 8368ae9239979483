"""`--rehearse`: a GPU recipe runs on CPU with its layout's degrees and says what it substituted."""

import json
import subprocess
import sys

import pytest

from matrix.layout import ParallelLayout
from trainer.rehearse import rehearsal


def test_rehearsal_keeps_degrees_and_lists_substitutions(matrix):
    rehearsed, changes = rehearsal(matrix, matrix.resolve("qwen2.5-7b"))
    assert rehearsed.layout.tp == 4 and rehearsed.recipe.gpus == 4 and rehearsed.dp == 1
    assert rehearsed.model.shape.query_groups == 4 and rehearsed.recipe.rollout.engine == "torch"
    assert rehearsed.recipe.grpo.clip_low == matrix.recipes["qwen2.5-7b"].grpo.clip_low
    text = "\n".join(changes)
    for words in ("model qwen2.5-7b → tiny-qwen2.5", "heads/query groups 4/2 → 4/4 so TP=4 divides them",
                  "image vllm-te27 → cpu", "rollout vllm (tp 1) → torch", "gpus 8 → 4 processes"):
        assert words in text, text


def test_rehearsal_of_a_cpu_recipe_changes_nothing(matrix):
    resolved = matrix.resolve("tiny-qwen2.5")
    assert rehearsal(matrix, resolved) == (resolved, [])


@pytest.mark.slow
def test_qwen25_7b_rehearses_with_tp4(repo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "qwen2.5-7b", "--rehearse", "--run-dir", str(tmp_path)],
                         cwd=repo, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rehearsal of qwen2.5-7b on CPU" in out.stdout and "tp=4" in out.stdout
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rehearse"] and config["world_size"] == 4
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((tmp_path / "checkpoints" / "episode-000002").glob("rank-*.pt"))) == 4


@pytest.mark.slow
def test_qwen3_8b_fsdp_rehearses_on_its_fsdp_layout(repo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "qwen3-8b-fsdp", "--rehearse", "--run-dir", str(tmp_path)],
                         cwd=repo, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "degrees kept (fsdp=8 ulysses=1)" in out.stdout
    assert len(list((tmp_path / "checkpoints" / "episode-000002").glob("rank-*.pt"))) == 8


def test_qwen3_next_rehearsal_keeps_its_hybrid_layout(matrix):
    """qwen3-next (TP2·PP8, ETP2·EP2) rehearses with tiny-qwen3-next on 32 processes, one layer per stage."""
    rehearsed, changes = rehearsal(matrix, matrix.resolve("qwen3-next"))
    layout = rehearsed.layout
    assert (layout.tp, layout.pp, layout.ep, layout.expert_tp, layout.sequence_parallel) == (2, 8, 2, 2, True)
    assert rehearsed.recipe.gpus == 32 and rehearsed.dp == 2
    assert rehearsed.model.family == "qwen3_next" and rehearsed.model.shape.layers == 8
    assert "model qwen3-next-80b-a3b → tiny-qwen3-next" in "\n".join(changes)


def test_tp4_widens_the_stand_ins_linear_attention_heads(matrix):
    """tiny-qwen3-next has 2 key / 4 value delta-net heads: under TP4 both are widened (value heads stay a
    multiple of key heads), and the rehearsed model passes the layout's own checks."""
    resolved = matrix.resolve("qwen3-next")
    resolved = resolved.model_copy(update={"layout": resolved.layout.model_copy(update={"tp": 4})})
    rehearsed, changes = rehearsal(matrix, resolved)
    linear = rehearsed.model.shape.linear_attention
    assert (linear.key_heads, linear.value_heads) == (4, 4)
    assert "linear-attention key/value heads 2/4 → 4/4 so TP=4 divides them" in "\n".join(changes)
    dims = ParallelLayout.of(rehearsed.layout, rehearsed.recipe.gpus)
    assert list(dims.model_problems(rehearsed.model.shape, "tiny-qwen3-next")) == []


def test_demo_vllm_rehearses_on_the_torch_engine_only_where_vllm_does_not_import(matrix):
    import importlib.util

    resolved = matrix.resolve("demo-vllm")
    rehearsed, changes = rehearsal(matrix, resolved)
    if importlib.util.find_spec("vllm") is None:
        assert rehearsed.recipe.rollout.engine == "torch"
        assert changes == ["rollout vllm → torch (vllm does not import here)"]
    else:
        assert (rehearsed, changes) == (resolved, [])
