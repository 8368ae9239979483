"""The committed matrix validates, and its derived sizes are the ones the seeds' layouts need."""

import json
import subprocess
import sys
import typing

from matrix import load_matrix
from matrix.cli import resolved_json
from matrix.schema import Family


def test_committed_matrix_derives_seed_gpu_counts():
    resolved = resolved_json(load_matrix())["recipes"]
    assert {k: resolved[k]["min_gpus"] for k in ("moonlight", "deepseek-v3", "qwen3-next")} == {
        "moonlight": 8, "deepseek-v3": 128, "qwen3-next": 32}
    assert resolved["deepseek-v3"]["dp"] == 2
    assert resolved["qwen3-8b-fsdp"]["dp"] == 8


def test_every_family_has_a_tiny_cpu_recipe():
    m = load_matrix()
    cpu_families = {m.models[r.model].family for r in m.recipes.values() if r.image == "cpu"}
    assert cpu_families == set(typing.get_args(Family))
    assert m.recipes["demo"].rollout.engine == "torch"


def test_cli_json_and_table(repo):
    out = subprocess.run([sys.executable, "-m", "matrix", "--json"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recipes"]["qwen3-next"]["min_gpus"] == 32
    table = subprocess.run([sys.executable, "-m", "matrix"], cwd=repo, capture_output=True, text=True)
    assert table.returncode == 0
    assert "moonlight-8 (TP2 PP2 CP2 EP2 ETP2)" in table.stdout
    assert "valid" in table.stdout
    rows = {line.split("│")[1].strip(): line for line in table.stdout.splitlines() if line.count("│") > 2}
    assert "(GPU) not verified here" in rows["moonlight"]
    assert "runs here" in rows["demo"]


def test_yaml_merge_keys_resolve_in_tiny_recipes():
    m = load_matrix()
    assert m.recipes["tiny-qwen3"].grpo == m.recipes["tiny-qwen2.5"].grpo
    assert m.recipes["tiny-qwen3"].model == "tiny-qwen3"
