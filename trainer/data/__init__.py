"""Prompt data: MATH-lighteval preprocessing, the embedded arithmetic demo task, a hub-free tokenizer."""

from trainer.data.demo_task import DemoTaskConfig, make_demo_problems, make_sft_pairs
from trainer.data.math_lighteval import MathDataError, preprocess, read_rows, write_rows
from trainer.data.prompts import PromptDataset, make_chat_formatter, plain_chat_format
from trainer.data.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "DemoTaskConfig",
    "MathDataError",
    "PromptDataset",
    "make_chat_formatter",
    "make_demo_problems",
    "make_sft_pairs",
    "plain_chat_format",
    "preprocess",
    "read_rows",
    "write_rows",
]
