"""Issue 22.8: your own data (`data.source: parquet`, verl's layout) and reward (`grpo.reward: "pkg.module:fn"`).

Every parquet file here is written by the test; the reward functions live in a module the test writes into its
working directory, as a user's would.
"""

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.cli import main
from trainer.data.verl_parquet import ParquetDataError, read_verl_rows
from trainer.reward.function import RewardFunction, RewardFunctionError, load

REWARDS = """
import math, time

def exact(response_text, ground_truth, extra):
    return float(response_text.strip().endswith(ground_truth))

def odd_only(response_text, ground_truth, extra):
    if int(ground_truth) % 2 == 0:
        raise RuntimeError("even ground truth")
    return 1.0

def echo_extra(response_text, ground_truth, extra):
    return float(extra["extra_info"]["weight"]) if extra["data_source"] == "toy" else -1.0

def raises(response_text, ground_truth, extra):
    return 1 / 0

def not_finite(response_text, ground_truth, extra):
    return math.nan

def not_a_number(response_text, ground_truth, extra):
    return "1.0"

def sleeps(response_text, ground_truth, extra):
    time.sleep(60)

def allocates_mib(response_text, ground_truth, extra):
    return float(len(bytearray(int(ground_truth) << 20)) >> 20)

def two_arguments(response_text, ground_truth):
    return 1.0

NOT_CALLABLE = 3
"""


def _row(i: int, split: str = "train", **changes) -> dict:
    a, b = divmod(i, 5)
    row = {
        "data_source": "toy",
        "prompt": [{"role": "user", "content": f"{a}+{b}="}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(a + b)},
        "extra_info": {"split": split, "index": i, "weight": 0.5},
    }
    return row | changes


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """The directory a user starts the trainer from: their reward module and their parquet file."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path / "toy.parquet", [_row(i) for i in range(25)] + [_row(i, "test") for i in range(25, 30)])
    return tmp_path


def test_verl_rows_read_with_ground_truth_split_and_extra(tmp_path):
    rows = read_verl_rows(
        _write(tmp_path / "t.parquet", [_row(0), _row(7, "test"), _row(4, extra_info=None)])
    )
    assert [r["ground_truth"] for r in rows] == ["0", "3", "4"]
    assert [r["split"] for r in rows] == ["train", "test", None]
    assert rows[0]["prompt"] == [{"role": "user", "content": "0+0="}]
    assert rows[1]["extra"] == {
        "data_source": "toy",
        "extra_info": {"split": "test", "index": 7, "weight": 0.5},
    }
    numbers = read_verl_rows(_write(tmp_path / "n.parquet", [_row(0, reward_model={"ground_truth": 42})]))
    assert numbers[0]["ground_truth"] == "42"  # a number is read as its text


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        (
            [{"prompt": [{"role": "user", "content": "1+1="}], "data_source": "toy"}],
            "column 'reward_model' is missing (has prompt, data_source); expected verl's layout",
        ),
        ([_row(0, prompt="1+1=")], "row 0: prompt is '1+1='; expected a non-empty list of chat messages"),
        ([_row(0, prompt=[])], "row 0: prompt is []"),
        ([_row(0, reward_model={"style": "rule"})], "row 0: reward_model is {'style': 'rule'"),
        (
            [_row(0, reward_model={"ground_truth": None})],
            "expected a struct whose ground_truth is a string or a number",
        ),
    ],
)
def test_unusable_rows_are_one_line_naming_file_and_row(tmp_path, rows, words):
    path = _write(tmp_path / "bad.parquet", rows)
    with pytest.raises(ParquetDataError) as err:
        read_verl_rows(path)
    assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_not_parquet_and_empty_files_are_one_line(tmp_path):
    (tmp_path / "a.parquet").write_text("prompt,reward_model\n")
    with pytest.raises(ParquetDataError, match="cannot read as parquet"):
        read_verl_rows(tmp_path / "a.parquet")
    empty = pa.Table.from_pylist([_row(0)]).slice(0, 0)
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(ParquetDataError, match="no rows"):
        read_verl_rows(tmp_path / "empty.parquet")


def test_reward_function_scores_and_counts_every_failure_as_zero(user_dir):
    assert RewardFunction("my_rewards:exact").score("so 2+2=4", "4", {}) == (1.0, True)
    assert RewardFunction("my_rewards:echo_extra").score(
        "x", "1", {"data_source": "toy", "extra_info": {"weight": 0.25}}
    ) == (0.25, True)
    for name in ("raises", "not_finite", "not_a_number"):
        assert RewardFunction(f"my_rewards:{name}").score("x", "1", {}) == (0.0, False), name


def test_reward_function_is_bounded_in_time_and_memory(user_dir):
    slow = RewardFunction("my_rewards:sleeps", timeout_s=0.5)
    start = time.perf_counter()
    assert slow.score("x", "1", {}) == (0.0, False)
    assert time.perf_counter() - start < 10  # killed at the deadline, not after the 60 s sleep
    capped = RewardFunction("my_rewards:allocates_mib", memory_limit_bytes=128 * 2**20)
    assert capped.score("x", "512", {}) == (0.0, False)  # 512 MiB past a 128 MiB cap: MemoryError, counted
    assert capped.score("x", "16", {}) == (16.0, True)  # under the cap, in the same worker


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        (
            "no_such_module:fn",
            "no module named 'no_such_module'; put no_such_module in the directory you start from",
        ),
        (
            "my_rewards:nope",
            "module my_rewards has no 'nope'; its functions: allocates_mib, echo_extra, exact",
        ),
        ("my_rewards:NOT_CALLABLE", "NOT_CALLABLE is a int, not a function"),
        ("my_rewards:two_arguments", "cannot take (response_text, ground_truth, extra)"),
    ],
)
def test_bad_reward_references_are_one_line(user_dir, ref, words):
    with pytest.raises(RewardFunctionError) as err:
        load(ref)
    assert words in str(err.value) and str(err.value).startswith(f"grpo.reward '{ref}'")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["data.path=missing.parquet"], "data file missing.parquet (a parquet file in verl's layout"),
        (["data.path={dir}/no_truth.parquet"], "column 'reward_model' is missing"),
        (
            ["data.path={dir}/toy.parquet", "grpo.reward=nowhere:fn"],
            "grpo.reward 'nowhere:fn': no module named",
        ),
        (["data.path={dir}/toy.parquet", "grpo.reward=my_rewards:nope"], "module my_rewards has no 'nope'"),
        (
            ["data.path={dir}/toy.parquet", "grpo.reward=my_rewards"],
            "grpo.reward: 'my_rewards': String should match",
        ),
        (
            ["data.path={dir}/train_only.parquet", "eval.every=1"],
            "held-out prompts for eval.every=1: data source parquet has none",
        ),
    ],
)
def test_bad_data_and_reward_input_is_one_line_exit_2(user_dir, capsys, overrides, words):
    _write(user_dir / "no_truth.parquet", [{"prompt": [{"role": "user", "content": "1+1="}]}])
    _write(user_dir / "train_only.parquet", [_row(i) for i in range(10)])
    runs = user_dir / "runs"
    argv = [
        "tiny-qwen2.5",
        "data.source=parquet",
        *(o.format(dir=user_dir) for o in overrides),
        "--runs",
        str(runs),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not runs.exists()


@pytest.mark.slow  # a 2-episode tiny run: 69 s on 2 shared cores at load 15
def test_a_run_on_your_parquet_with_a_crashing_reward_finishes_and_counts_the_failures(repo, user_dir):
    """odd_only raises on every even ground truth: those samples score 0, are counted, and the run goes on."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "tiny-qwen2.5",
            "data.source=parquet",
            f"data.path={user_dir / 'toy.parquet'}",
            "grpo.reward=my_rewards:odd_only",
            "run.episodes=2",
            "eval.every=2",
            "eval.prompts=5",
            "--run-dir",
            str(user_dir / "run"),
        ],
        cwd=user_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (user_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    n = 4  # samples_per_prompt of tiny-qwen2.5
    # 8 prompts x 4 samples: every sample of an even-truth prompt failed, every other scored 1
    for row in rows:
        assert row["reward/failed"] > 0 and row["reward/failed"] % n == 0
        assert row["reward/mean"] == pytest.approx(1 - row["reward/failed"] / 32)
    assert "eval/reward_mean" in rows[-1]  # the held-out rows (extra_info.split == "test") were evaluated
