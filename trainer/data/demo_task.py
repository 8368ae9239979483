"""The embedded demo task: small arithmetic problems with ``\\boxed{N}`` answers, no hub, seeded.

A problem is the bare expression (``"3+4="``); the expected response is ``"\\boxed{7}"``. Short prompts
and answers keep a tiny character-level model (``tokenizer.py``) fast on 2 CPU cores. Rows have the
same schema as MATH-lighteval (``math_lighteval.py``), so the trainer and the hendrycks grader treat
both alike.

For the warm start, :func:`make_sft_pairs` gives (prompt, target) pairs with a chosen fraction of
targets wrong, so the warm-started model is right only part of the time and GRPO has room to improve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DATA_SOURCE = "demo/arithmetic"
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class DemoTaskConfig:
    """Shape of the demo problems."""

    n_problems: int = 512  # distinct prompts drawn (duplicates possible for a small operand range)
    min_operand: int = 0
    max_operand: int = 20  # inclusive; 0..20 with + and - is 882 distinct problems
    ops: tuple[str, ...] = ("+", "-")  # any of "+", "-", "*"
    allow_negative: bool = False  # False: "a-b" is drawn with a >= b
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in OPS]
        if bad or not self.ops:
            raise ValueError(f"DemoTaskConfig.ops={self.ops!r}: unknown {bad}; valid ops are {sorted(OPS)}")
        if self.min_operand > self.max_operand:
            raise ValueError(
                f"DemoTaskConfig: min_operand={self.min_operand} > max_operand={self.max_operand}"
            )
        if self.n_problems < 0:
            raise ValueError(f"DemoTaskConfig.n_problems must be >= 0, got {self.n_problems}")


def boxed(answer: int | str) -> str:
    """The target response for an answer: ``\\boxed{answer}``."""
    return f"\\boxed{{{answer}}}"


def _draw(cfg: DemoTaskConfig, rng: random.Random) -> tuple[str, int]:
    """One ``(expression, answer)`` pair."""
    op = rng.choice(cfg.ops)
    a, b = (rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(2))
    if op == "-" and not cfg.allow_negative and a < b:
        a, b = b, a
    return f"{a}{op}{b}=", OPS[op](a, b)


def make_demo_problems(cfg: DemoTaskConfig = DemoTaskConfig(), split: str = "train") -> list[dict]:
    """``cfg.n_problems`` rows in the shared prompt schema; the same ``cfg`` always gives the same rows.

    Use a different ``seed`` for a held-out split.
    """
    rng = random.Random(cfg.seed)
    rows = []
    for i in range(cfg.n_problems):
        expr, answer = _draw(cfg, rng)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": expr}],
                "ground_truth": str(answer),
                "split": split,
                "index": i,
            }
        )
    return rows


def make_sft_pairs(
    cfg: DemoTaskConfig = DemoTaskConfig(), corrupt_frac: float = 0.0, corrupt_seed: int = 1
) -> list[dict]:
    """Warm-start pairs ``{"prompt": messages, "response": "\\boxed{N}", "correct": bool}``.

    Exactly ``round(corrupt_frac * n)`` responses (chosen at random, seeded) carry a wrong answer:
    the true one plus a nonzero offset in ``[-3, 3]``, so wrong answers stay plausible.
    """
    if not 0.0 <= corrupt_frac <= 1.0:
        raise ValueError(f"corrupt_frac must be in [0, 1], got {corrupt_frac}")
    rows = make_demo_problems(cfg)
    rng = random.Random(corrupt_seed)
    corrupt = set(rng.sample(range(len(rows)), round(corrupt_frac * len(rows))))
    pairs = []
    for i, row in enumerate(rows):
        answer = int(row["ground_truth"])
        if i in corrupt:
            answer += rng.choice([-3, -2, -1, 1, 2, 3])
        pairs.append({"prompt": row["prompt"], "response": boxed(answer), "correct": i not in corrupt})
    return pairs
