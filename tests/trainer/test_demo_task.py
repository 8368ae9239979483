"""The embedded arithmetic demo task, its warm-start pairs, and prompts through the char tokenizer."""

import logging

import pytest

from trainer.data.demo_task import DemoTaskConfig, boxed, make_demo_problems, make_sft_pairs
from trainer.data.prompts import PromptDataset
from trainer.data.tokenizer import CharTokenizer
from trainer.reward import score


def _solve(expr: str) -> int:
    """Independent evaluation of "a<op>b=" (no shared code with the generator)."""
    for op in "+-*":
        a, sep, b = expr.rstrip("=").rpartition(op)
        if sep and a:
            return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    raise AssertionError(expr)


def test_problems_are_deterministic_and_correct():
    cfg = DemoTaskConfig(n_problems=50, ops=("+", "-", "*"), seed=3)
    rows = make_demo_problems(cfg)
    assert rows == make_demo_problems(cfg)
    assert rows != make_demo_problems(DemoTaskConfig(n_problems=50, ops=("+", "-", "*"), seed=4))
    assert [r["index"] for r in rows] == list(range(50))
    for r in rows:
        expr = r["prompt"][0]["content"]
        assert r["prompt"][0]["role"] == "user" and expr.endswith("=")
        assert int(r["ground_truth"]) == _solve(expr)
        assert score(boxed(r["ground_truth"]), r["ground_truth"]) == 1.0


def test_operand_range_and_no_negatives():
    rows = make_demo_problems(DemoTaskConfig(n_problems=200, min_operand=3, max_operand=5, ops=("-",)))
    for r in rows:
        a, b = r["prompt"][0]["content"].rstrip("=").split("-")
        assert 3 <= int(b) <= int(a) <= 5 and int(r["ground_truth"]) >= 0
    negative = make_demo_problems(DemoTaskConfig(n_problems=200, ops=("-",), allow_negative=True))
    assert any(int(r["ground_truth"]) < 0 for r in negative)


def test_bad_config_names_valid_ops():
    with pytest.raises(ValueError, match=r"valid ops are \['\*', '\+', '-'\]"):
        DemoTaskConfig(ops=("/",))
    with pytest.raises(ValueError, match="min_operand"):
        DemoTaskConfig(min_operand=5, max_operand=1)


@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_sft_pairs_corrupt_exact_fraction(frac):
    cfg = DemoTaskConfig(n_problems=100)
    pairs = make_sft_pairs(cfg, corrupt_frac=frac)
    assert pairs == make_sft_pairs(cfg, corrupt_frac=frac)
    rows = make_demo_problems(cfg)
    rewards = [score(p["response"], r["ground_truth"]) for p, r in zip(pairs, rows, strict=True)]
    assert sum(rewards) == 100 - round(frac * 100)
    assert [p["correct"] for p in pairs] == [rw == 1.0 for rw in rewards]
    assert all(p["response"].startswith("\\boxed{") for p in pairs)
    with pytest.raises(ValueError, match="corrupt_frac"):
        make_sft_pairs(cfg, corrupt_frac=1.5)


def test_prompt_dataset_with_char_tokenizer_drops_long_prompts(caplog):
    tok = CharTokenizer()
    rows = make_demo_problems(DemoTaskConfig(n_problems=20, min_operand=0, max_operand=20))
    # "<bos><|user|>" + "a+b=" + "<|end|><|assistant|>": 4 special ids + 4..6 characters
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset(rows, tok, max_prompt_len=9)
    lengths = [4 + len(r["prompt"][0]["content"]) for r in rows]
    assert len(ds) == sum(n <= 9 for n in lengths) and ds.num_dropped == sum(n > 9 for n in lengths) > 0
    assert f"dropped {ds.num_dropped} of 20" in caplog.text
    item = ds[0]
    assert item["prompt_ids"] == tok.encode(item["prompt_text"]) and item["prompt_ids"][0] == tok.bos_token_id
    assert item["prompt_text"].endswith("<|assistant|>") and "ground_truth" in item
    assert len(PromptDataset(rows, tok, max_prompt_len=100)) == 20


def test_prompt_dataset_custom_template_and_validation():
    tok = CharTokenizer()
    rows = make_demo_problems(DemoTaskConfig(n_problems=3))
    ds = PromptDataset(rows, tok, max_prompt_len=50, chat_template=lambda m: "Q:" + m[-1]["content"])
    assert ds[0]["prompt_text"] == "Q:" + rows[0]["prompt"][0]["content"]
    with pytest.raises(ValueError, match="max_prompt_len"):
        PromptDataset(rows, tok, max_prompt_len=0)
