"""MATH-lighteval preprocessing from a parquet in the real schema, its errors, and the prompt dataset."""

import pandas as pd
import pytest

from trainer.data import math_lighteval
from trainer.data.math_lighteval import (
    DATA_SOURCE,
    INSTRUCTION,
    MathDataError,
    main,
    preprocess,
    read_rows,
    write_rows,
)
from trainer.data.prompts import PromptDataset, make_chat_formatter, plain_chat_format

SOLUTIONS = [
    r"We have $1+1=2$, so the answer is $\boxed{2}$.",
    r"Half of it: $\boxed{\frac{1}{2}}$, not $\boxed{1}$... actually $\boxed{\dfrac{1}{2}}$.",
    "No boxed answer in this one.",
    r"The set is $\boxed{\{1, \{2\}\}}$.",
]


def _write_math(path, **overrides):
    """A small parquet with the hub dataset's columns (problem, level, type, solution: strings)."""
    df = pd.DataFrame(
        {
            "problem": [f"Problem {i}?" for i in range(4)],
            "level": ["Level 1", "Level 2", "Level 3", "Level 5"],
            "type": ["Algebra", "Prealgebra", "Geometry", "Counting & Probability"],
            "solution": SOLUTIONS,
        }
    )
    for col, val in overrides.items():
        if val is None:
            df = df.drop(columns=col)
        else:
            df[col] = val
    df.to_parquet(path)
    return path


def test_preprocess_rows(tmp_path, caplog):
    rows = preprocess(_write_math(tmp_path / "train.parquet"), split="train")
    assert [r["index"] for r in rows] == [0, 1, 3]  # row 2 has no box: skipped, indices kept
    assert "skipped 1 of 4" in caplog.text
    assert rows[0] == {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": "Problem 0?" + INSTRUCTION}],
        "ground_truth": "2",
        "split": "train",
        "index": 0,
        "level": "Level 1",
        "type": "Algebra",
    }
    assert INSTRUCTION == " Let's think step by step and output the final answer in \\boxed{}."
    assert rows[1]["ground_truth"] == r"\dfrac{1}{2}"  # the last box
    assert rows[2]["ground_truth"] == r"\{1, \{2\}\}"  # nested braces


def test_write_read_roundtrip_is_atomic(tmp_path):
    rows = preprocess(_write_math(tmp_path / "test.parquet"), split="test")
    out = write_rows(rows, tmp_path / "out" / "test.parquet")
    assert read_rows(out) == rows
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.parquet"]  # no temporary left behind
    write_rows(rows[:1], out)  # overwrite in place
    assert read_rows(out) == rows[:1]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    out = write_rows([{"a": 1}], tmp_path / "x.parquet")

    def crash_midway(table, path):
        with open(path, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(math_lighteval.pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_rows([{"a": 2}], out)
    assert pd.read_parquet(out)["a"].tolist() == [1]  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]  # and the partial temp is gone


def test_missing_column_is_one_line_naming_file_and_column(tmp_path):
    src = _write_math(tmp_path / "bad.parquet", solution=None)
    with pytest.raises(MathDataError) as err:
        preprocess(src, "train")
    msg = str(err.value)
    assert "\n" not in msg and str(src) in msg and "'solution'" in msg and "expected columns" in msg
    assert isinstance(err.value, ValueError)


def test_wrong_type_and_unreadable_file(tmp_path):
    src = _write_math(tmp_path / "ints.parquet", level=[1, 2, 3, 5])
    with pytest.raises(
        MathDataError, match=r"ints\.parquet: column 'level' row 0 is int .*expected a string"
    ):
        preprocess(src, "train")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file\n" * 10)
    with pytest.raises(MathDataError) as err:
        preprocess(junk, "train")
    assert "\n" not in str(err.value) and "junk.parquet" in str(err.value) and "problem" in str(err.value)
    with pytest.raises(MathDataError, match="missing.parquet"):
        preprocess(tmp_path / "missing.parquet", "train")
    with pytest.raises(MathDataError, match="'data_source' is missing"):
        read_rows(src)


def test_cli(tmp_path, capsys):
    src = _write_math(tmp_path / "train.parquet")
    assert main([str(src), str(tmp_path / "o.parquet"), "--split", "train"]) == 0
    assert "3 rows" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "o.parquet")) == 3


class _HFLikeTokenizer:
    """Stands in for a Hugging Face tokenizer: a chat template and whitespace 'tokens'."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "<s>user\n" + messages[-1]["content"] + "\nassistant\n"

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return list(range(len(text.split())))


def test_prompt_dataset_over_math_rows(tmp_path):
    rows = read_rows(
        write_rows(preprocess(_write_math(tmp_path / "t.parquet"), "train"), tmp_path / "o.parquet")
    )
    tok = _HFLikeTokenizer()
    ds = PromptDataset(rows, tok, max_prompt_len=16)
    assert len(ds) == 3 and ds.num_dropped == 0
    assert ds[0]["prompt_text"].startswith("<s>user\nProblem 0?") and ds[0]["ground_truth"] == "2"
    assert PromptDataset(rows, tok, max_prompt_len=15).num_dropped == 3  # 16 whitespace tokens each


def test_formatter_fallback_without_template():
    class NoTemplate:
        chat_template = None

        def apply_chat_template(self, *a, **k):
            raise AssertionError("must not be called")

    fmt = make_chat_formatter(NoTemplate())
    assert fmt is plain_chat_format
    assert fmt([{"role": "user", "content": "2+2="}]) == "user: 2+2=\nassistant:"
