"""Bad MATH-lighteval input at the command line and in a training run: one line, exit 2, nothing written."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

GOOD = {
    "problem": ["1+1?", "2+2?", "3+3?"],
    "level": ["Level 1"] * 3,
    "type": ["Algebra"] * 3,
    "solution": [r"$\boxed{2}$", r"$\boxed{4}$", r"$\boxed{6}$"],
}


def _parquet(path, **columns):
    arrays = {k: pa.array(v) for k, v in (GOOD | columns).items()}
    if isinstance(columns.get("problem"), list) and isinstance(columns["problem"][0], bytes):
        arrays["problem"] = pa.array(columns["problem"], pa.binary()).view(pa.string())  # unvalidated bytes
    pq.write_table(pa.table(arrays), path)
    return path


def _cli(repo, *args):
    return subprocess.run(
        [sys.executable, "-m", "trainer.data.math_lighteval", *map(str, args)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("columns", "words"),
    [
        ({}, None),
        (
            {"problem": [b"1+1?", b"2+2?", b"caf\xe9?"]},
            "column 'problem' row 2 is not valid UTF-8 (byte 3: b'\\xe9')",
        ),
        ({"solution": ["no box", "none here", "nor here"]}, "none of its 3 rows has a \\boxed{} answer"),
        ("junk", "cannot read as parquet"),
    ],
    ids=["good", "invalid-utf8", "no-usable-row", "not-parquet"],
)
def test_preprocess_cli_bad_input_is_one_line_exit_2(repo, tmp_path, columns, words):
    src, out = tmp_path / "src.parquet", tmp_path / "out" / "train.parquet"
    if columns == "junk":
        src.write_bytes(b"not parquet\n" * 10)
    else:
        _parquet(src, **columns)
    result = _cli(repo, src, out)
    if words is None:
        assert result.returncode == 0 and out.is_file(), result.stderr
        return
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and str(src) in result.stderr and words in result.stderr, (
        result.stderr
    )
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_math_data_on_a_model_without_a_tokenizer_source_fails_in_the_preflight(repo, tmp_path):
    """tiny-qwen2.5 has no hf_id: the preflight says so in one line, before any network or run directory."""
    _cli(repo, _parquet(tmp_path / "src.parquet"), tmp_path / "train.parquet").check_returncode()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "tiny-qwen2.5",
            "data.source=math-lighteval",
            f"data.path={tmp_path / 'train.parquet'}",
            "--runs",
            str(tmp_path / "runs"),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "a tokenizer for data.source math-lighteval: model tiny-qwen2.5 has no hf_id" in result.stderr
    assert not (tmp_path / "runs").exists()
