"""Prompt data: MATH-lighteval preprocessing, the embedded arithmetic demo task, a hub-free tokenizer.

``trainer.data.math_lighteval`` is not imported here: it is also a command (``python -m``), which runpy warns
about when its package has imported it already."""

from trainer.data.demo_task import DemoTaskConfig, make_demo_problems, make_sft_pairs
from trainer.data.prompts import PromptDataset, make_chat_formatter, plain_chat_format
from trainer.data.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "DemoTaskConfig",
    "PromptDataset",
    "make_chat_formatter",
    "make_demo_problems",
    "make_sft_pairs",
    "plain_chat_format",
]
