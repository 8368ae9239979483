"""MATH-lighteval preprocessing: the hub parquet files -> prompt rows with boxed ground truths.

Input: the parquet files of ``DigitalLearningGmbH/MATH-lighteval`` (``data/train-*.parquet``,
``data/test-*.parquet``), columns ``problem, level, type, solution`` (all strings). Output rows, as in
verl's ``examples/data_preprocess/math_dataset.py`` and ChatLearn's MATH recipe::

    {"data_source": "DigitalLearningGmbH/MATH-lighteval",
     "prompt": [{"role": "user", "content": problem + INSTRUCTION}],
     "ground_truth": last_boxed(solution), "split": split, "index": i, "level": level, "type": type}

Usage: ``python -m trainer.data.math_lighteval SRC.parquet OUT.parquet --split train``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.reward.extract import last_boxed

logger = logging.getLogger(__name__)

DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
INSTRUCTION = " Let's think step by step and output the final answer in \\boxed{}."
COLUMNS = ("problem", "level", "type", "solution")


class MathDataError(ValueError):
    """Input or preprocessed data is unusable; the message is one line naming file, column, expectation."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:200]


def _read_table(path: Path, columns: tuple[str, ...]) -> pa.Table:
    """Read ``path`` and check that every column in ``columns`` is present as strings."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise MathDataError(
            f"{path}: cannot read as parquet ({_one_line(exc)}); "
            f"expected a parquet file with columns {', '.join(columns)}"
        ) from None
    for col in columns:
        if col not in table.column_names:
            raise MathDataError(
                f"{path}: column {col!r} is missing (has {', '.join(table.column_names) or 'none'}); "
                f"expected columns {', '.join(columns)}"
            )
    return table


def _strings(path: Path, table: pa.Table, col: str) -> list[str]:
    """Column ``col`` as Python strings; a value that is not a string, or not valid UTF-8, names its row."""
    column = table.column(col)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        values = column.to_pylist()
        i, v = next((i, v) for i, v in enumerate(values) if not isinstance(v, str))
        raise MathDataError(f"{path}: column {col!r} row {i} is {type(v).__name__} {v!r:.40}; expected a string")
    values = []
    # read as bytes and decode here: pyarrow's own conversion fails on bad UTF-8 without saying where
    for i, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
        if raw is None:
            raise MathDataError(f"{path}: column {col!r} row {i} is empty (null); expected a string")
        try:
            values.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MathDataError(f"{path}: column {col!r} row {i} is not valid UTF-8 (byte {exc.start}: "
                                f"{raw[exc.start:exc.start + 1]!r}); re-encode the file as UTF-8") from None
    return values


def preprocess(src: str | Path, split: str) -> list[dict]:
    """Rows of one split from a MATH-lighteval parquet file; solutions without a box are skipped (logged)."""
    src = Path(src)
    table = _read_table(src, COLUMNS)
    data = {col: _strings(src, table, col) for col in COLUMNS}
    rows, skipped = [], 0
    for i, (problem, level, kind, solution) in enumerate(zip(*(data[c] for c in COLUMNS), strict=True)):
        answer = last_boxed(solution)
        if answer is None:
            skipped += 1
            continue
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": problem + INSTRUCTION}],
                "ground_truth": answer,
                "split": split,
                "index": i,
                "level": level,
                "type": kind,
            }
        )
    if not rows:
        raise MathDataError(f"{src}: none of its {len(data['problem'])} rows has a \\boxed{{}} answer in its "
                            "solution, so none can be graded; expected a MATH-lighteval parquet file")
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows whose solution has no \\boxed{} answer",
            src,
            skipped,
            len(data["problem"]),
        )
    return rows


def write_rows(rows: list[dict], out: str | Path) -> Path:
    """Write rows to parquet atomically: a temporary file in the same directory, then ``os.replace``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, out)  # readers see the old file or the complete new one, never a partial write
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_rows(path: str | Path) -> list[dict]:
    """Preprocessed rows back from parquet, as plain dicts with ``prompt`` a list of message dicts."""
    path = Path(path)
    table = _read_table(path, ("data_source", "prompt", "ground_truth", "index"))
    return table.to_pylist()


def main(argv: list[str] | None = None) -> int:
    """CLI: preprocess one split file into one output parquet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a MATH-lighteval parquet file (columns problem, level, type, solution)")
    parser.add_argument("out", help="output parquet path")
    parser.add_argument("--split", default="train", help="split name written into every row")
    args = parser.parse_args(argv)
    try:
        rows = preprocess(args.src, args.split)
    except MathDataError as exc:  # bad input: its one line, nothing written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(rows)} rows -> {write_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
