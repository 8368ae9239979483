"""Prompt dataset: chat-templated prompts, tokenised, with over-long prompts dropped.

Rows are the preprocessed schema shared by MATH-lighteval and the demo task::

    {"data_source": str, "prompt": [{"role": "user", "content": str}], "ground_truth": str, "index": int, ...}

Prompts longer than ``max_prompt_len`` tokens are dropped up front, not truncated: a truncated math
problem has a different answer. ChatLearn and verl (``filter_overlong_prompts``) do the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

ChatFormatter = Callable[[list[dict]], str]


def plain_chat_format(messages: list[dict]) -> str:
    """Fallback template for tokenizers without one: ``role: content`` lines, then ``assistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def make_chat_formatter(tokenizer: Any, template: ChatFormatter | None = None) -> ChatFormatter:
    """The callable turning messages into the prompt string.

    ``template`` wins if given; else the tokenizer's ``apply_chat_template`` when it has a chat template
    (a Hugging Face tokenizer without one raises on that call); else :func:`plain_chat_format`.
    """
    if template is not None:
        return template
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        return lambda messages: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return plain_chat_format


class PromptDataset:
    """Indexable prompts; item ``i`` is the row plus ``prompt_text`` and ``prompt_ids`` (list of ints).

    Attributes:
        num_dropped: rows dropped because their prompt exceeded ``max_prompt_len`` tokens.
    """

    def __init__(
        self,
        rows: Sequence[dict],
        tokenizer: Any,
        max_prompt_len: int,
        chat_template: ChatFormatter | None = None,
    ) -> None:
        """Template and tokenise every row once; ``tokenizer`` needs ``encode(text, add_special_tokens=)``."""
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        fmt = make_chat_formatter(tokenizer, chat_template)
        self.items: list[dict] = []
        self.num_dropped = 0
        for row in rows:
            text = fmt(list(row["prompt"]))
            # the template already holds any bos: do not let the tokenizer add another
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) > max_prompt_len:
                self.num_dropped += 1
                continue
            self.items.append({**row, "prompt_text": text, "prompt_ids": ids})
        if self.num_dropped:
            logger.warning(
                "dropped %d of %d prompts longer than max_prompt_len=%d tokens",
                self.num_dropped,
                len(rows),
                max_prompt_len,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
