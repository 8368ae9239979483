"""Nodes in the matrix: gpus_per_node (8 on GPUs, the whole host on CPU), the node count, and layouts refused in one
line when they would split a TP (or, asked for, an ETP·EP) group across nodes."""

import subprocess
import sys

import pytest

from trainer.config import TrainerInputError, resolve


def test_node_defaults_and_count():
    assert (resolve("deepseek-v3", {}).gpus_per_node, resolve("deepseek-v3", {}).nodes) == (8, 16)
    cpu = resolve("tiny-qwen2.5", {"layout": "tp2", "gpus": 2})
    assert (cpu.gpus_per_node, cpu.nodes) == (2, 1)  # a CPU recipe: one host holds every process
    assert resolve("tiny-qwen2.5", {"layout": "dp2", "gpus": 2, "gpus_per_node": 1}).nodes == 2


@pytest.mark.parametrize(("overrides", "words"), [
    ({"layout": "tp2", "gpus": 2, "gpus_per_node": 1}, "tp=2 would split tensor-parallel groups across nodes of 1"),
    ({"layout": "tp2", "gpus": 6, "gpus_per_node": 4}, "6 GPUs are not whole nodes of 4"),
])
def test_a_layout_split_across_nodes_is_refused(overrides, words):
    with pytest.raises(TrainerInputError, match=words) as refused:
        resolve("tiny-qwen2.5", overrides)
    assert "gpus_per_node" in str(refused.value) and "\n" not in str(refused.value)


def test_expert_groups_stay_in_a_node_only_when_asked():
    moe = {"layout": "ep2", "gpus": 2, "gpus_per_node": 1}
    assert resolve("tiny-moonlight", moe).nodes == 2  # EP may cross nodes by default
    with pytest.raises(TrainerInputError, match=r"ETP·EP=1·2=2 would split expert groups across nodes of 1"):
        resolve("tiny-moonlight", moe | {"experts_in_node": True})


def test_the_cli_refuses_in_one_line_with_exit_2(repo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", "layout=tp2", "gpus=2", "gpus_per_node=1",
                          "--run-dir", str(tmp_path / "run")], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "would split tensor-parallel groups across nodes" in out.stderr and not (tmp_path / "run").exists()
