"""A character-level tokenizer that needs no hub download, for the CPU demo and tests.

Vocabulary: the special tokens first (ids 0..7), then newline, tab and the 95 printable ASCII characters
(space through ``~``), which cover digits, operators, letters and ``\\boxed{}``. Any other character is
``<unk>``. 105 ids in all, fixed, so a checkpoint trained with it needs no saved vocabulary.

Special tokens are written in text as their names (``<|user|>``) and :meth:`CharTokenizer.encode`
maps those strings back to single ids, so ``encode(apply_chat_template(messages))`` works as with a
Hugging Face tokenizer. The method names and keyword arguments mirror ``transformers`` where the
trainer uses them (``encode(add_special_tokens=)``, ``decode(skip_special_tokens=)``,
``apply_chat_template(tokenize=, add_generation_prompt=)``, ``pad_token_id`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, END)
CHARACTERS = "\n\t" + "".join(chr(c) for c in range(32, 127))
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The fixed chat template, in the Hugging Face sense; shown for humans, applied by apply_chat_template.
CHAT_TEMPLATE = "<bos>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"


class CharTokenizer:
    """Character-level tokenizer with pad/bos/eos/unk and chat-role special tokens."""

    chat_template = CHAT_TEMPLATE
    pad_token, bos_token, eos_token, unk_token = PAD, BOS, EOS, UNK

    def __init__(self) -> None:
        """Build the fixed vocabulary (no arguments: every instance is identical)."""
        self.id_to_token: list[str] = [*SPECIAL_TOKENS, *CHARACTERS]
        self.token_to_id = {tok: i for i, tok in enumerate(self.id_to_token)}
        self._special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

    @property
    def vocab_size(self) -> int:
        """Number of ids (special tokens included)."""
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return self.token_to_id[PAD]

    @property
    def bos_token_id(self) -> int:
        """Id of ``<bos>``."""
        return self.token_to_id[BOS]

    @property
    def eos_token_id(self) -> int:
        """Id of ``<eos>``; generation stops here."""
        return self.token_to_id[EOS]

    @property
    def unk_token_id(self) -> int:
        """Id that every character outside the vocabulary maps to."""
        return self.token_to_id[UNK]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; special-token names in the text become their single ids.

        ``add_special_tokens`` prepends ``<bos>`` (chat-templated text already starts with it).
        """
        ids = [self.bos_token_id] if add_special_tokens else []
        pos = 0
        for match in self._special.finditer(text):
            ids.extend(self.token_to_id.get(ch, self.unk_token_id) for ch in text[pos : match.start()])
            ids.append(self.token_to_id[match.group()])
            pos = match.end()
        ids.extend(self.token_to_id.get(ch, self.unk_token_id) for ch in text[pos:])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (ints or a 1-D tensor); ``skip_special_tokens`` drops pad/bos/eos/role tokens."""
        n_special = len(SPECIAL_TOKENS)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            if not (skip_special_tokens and i < n_special):
                out.append(self.id_to_token[i])
        return "".join(out)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each sequence."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """``<bos><|role|>content<|end|>...`` plus ``<|assistant|>`` when ``add_generation_prompt``.

        Returns the string, or its ids when ``tokenize`` (the Hugging Face default is True; here False,
        the common use).
        """
        parts = [BOS]
        for m in messages:
            if m["role"] not in ROLE_TOKENS:
                raise ValueError(f"unknown chat role {m['role']!r}; valid roles are {sorted(ROLE_TOKENS)}")
            parts += [ROLE_TOKENS[m["role"]], m["content"], END]
        if add_generation_prompt:
            parts.append(ASSISTANT)
        text = "".join(parts)
        return self.encode(text) if tokenize else text
