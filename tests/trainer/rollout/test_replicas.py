"""Engine replicas (trainer.rollout.replicas) on CPU: the runs prompts are cut into, and the factory's count. The
replicas themselves run with vLLM's CPU build in tests/vllm/test_vllm_engine.py."""

import pytest

from trainer.config import parse_overrides, resolve
from trainer.rollout.factory import engine_replicas
from trainer.rollout.replicas import runs


def test_runs_are_contiguous_and_differ_by_at_most_one():
    assert runs(4, 2) == [(0, 2), (2, 4)]
    assert runs(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert runs(1, 3) == [(0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize(("recipe", "overrides", "expected"), [
    ("demo-vllm", [], 1),  # on its own devices, engines unset: one
    ("demo-vllm", ["rollout.engines=2"], 2),
    ("moonlight", [], 4),  # colocated: tp 2 × 4 = the node's 8 GPUs
    ("qwen3-next", [], 2),  # tp 4 × 8 over 4 nodes: the driver's node holds 2
])
def test_the_factory_starts_the_engines_the_driver_can_place(recipe, overrides, expected, capsys):
    assert engine_replicas(resolve(recipe, parse_overrides(overrides))) == expected
    said = capsys.readouterr().err
    assert ("engines on the other nodes are not built" in said) == (recipe == "qwen3-next")
