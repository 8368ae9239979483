"""Your own prompts: any parquet file in verl's layout (``data.source: parquet``), as verl's preprocessing writes it.

Columns (one row per prompt)::

    prompt        list of chat messages [{"role": "user", "content": "..."}, ...]   (required)
    reward_model  {"ground_truth": "...", ...}; a number is read as its text        (required)
    data_source   string, passed to a reward function in ``extra``                   (optional)
    extra_info    struct, passed to a reward function in ``extra``; rows whose
                  ``extra_info.split`` is "test" are held out for evaluation         (optional)

Other columns (verl's ``ability``, ...) are ignored. The prompt becomes text through the model's chat template
(``prompts.make_chat_formatter``), so the same file trains any model. Rows come back in the shared prompt schema
(``prompts.py``) plus ``extra``.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED = ("prompt", "reward_model")
OPTIONAL = ("data_source", "extra_info")
HELD_OUT_SPLIT = "test"


class ParquetDataError(ValueError):
    """The file is not usable as verl-layout prompts; the message is one line naming file, row and expectation."""


def _short(value: object) -> str:
    return " ".join(repr(value).split())[:60]


def _messages(path: Path, i: int, prompt: object) -> list[dict]:
    ok = (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    )
    if not ok:
        raise ParquetDataError(
            f"{path}: row {i}: prompt is {_short(prompt)}; expected a non-empty list of chat "
            f"messages {{'role': str, 'content': str}}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _ground_truth(path: Path, i: int, reward_model: object) -> str:
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, str):
        return truth
    if isinstance(truth, Real) and not isinstance(truth, bool):
        return str(truth)
    raise ParquetDataError(
        f"{path}: row {i}: reward_model is {_short(reward_model)}; expected a struct whose "
        f"ground_truth is a string or a number"
    )


def read_verl_rows(path: str | Path) -> list[dict]:
    """Every row of ``path`` checked and converted; ParquetDataError on the first unusable one."""
    path = Path(path)
    expected = f"expected verl's layout: columns {', '.join(REQUIRED)} (and optionally {', '.join(OPTIONAL)})"
    try:
        schema = pq.read_schema(path)
        missing = [c for c in REQUIRED if c not in schema.names]
        if missing:
            raise ParquetDataError(
                f"{path}: column {missing[0]!r} is missing (has {', '.join(schema.names)}); {expected}"
            )
        columns = [c for c in (*REQUIRED, *OPTIONAL) if c in schema.names]
        rows = pq.read_table(path, columns=columns).to_pylist()
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise ParquetDataError(
            f"{path}: cannot read as parquet ({' '.join(str(exc).split())[:160]}); {expected}"
        ) from None
    if not rows:
        raise ParquetDataError(f"{path}: no rows; {expected}, one row per prompt")
    out = []
    for i, row in enumerate(rows):
        extra_info = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        data_source = row.get("data_source")
        out.append(
            {
                "data_source": data_source,
                "prompt": _messages(path, i, row["prompt"]),
                "ground_truth": _ground_truth(path, i, row["reward_model"]),
                "split": extra_info.get("split"),
                "index": i,
                "extra": {"data_source": data_source, "extra_info": row.get("extra_info")},
            }
        )
    return out
