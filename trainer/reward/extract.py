"""Find the final answer of a response: the last ``\\boxed{...}`` (hendrycks MATH ``last_boxed_only_string``).

Differences from the hendrycks/verl original, all on inputs it would crash, hang or mis-read on:

* only the last ``max_chars`` of the response are searched (the final answer is at the end; a
  megabyte of model output costs the same as 64 KiB);
* an unclosed box, or braces nested deeper than ``max_depth``, yield ``None`` (score 0);
* ``\\boxed 7`` takes the token up to ``$`` or whitespace (the original takes everything up to ``$``, and
  prefers any ``\\boxed `` over a later ``\\boxed{``; here the last box wins, whichever its form).

Like the original, ``\\fbox`` is used only when there is no ``\\boxed``, and escaped braces ``\\{`` count
toward the nesting (MATH solutions balance them).
"""

from __future__ import annotations

import re

MAX_RESPONSE_CHARS = 64 * 1024  # the tail of the response searched for the last box
MAX_BRACE_DEPTH = 64  # deeper nesting is not a math answer; refuse it rather than walk it

_SPACE_FORM = re.compile(r"\s+([^\s$]+)")


def last_boxed(
    text: str, max_chars: int = MAX_RESPONSE_CHARS, max_depth: int = MAX_BRACE_DEPTH
) -> str | None:
    """Inner string of the last ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` in ``text``, else None.

    >>> last_boxed(r"so $\\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    """
    if not isinstance(text, str):
        return None
    tail = text[-max_chars:] if max_chars else text
    for command in ("\\boxed", "\\fbox"):
        start = tail.rfind(command)
        if start >= 0:
            return _box_content(tail, start + len(command), max_depth)
    return None


def _box_content(text: str, pos: int, max_depth: int) -> str | None:
    """Content after a box command ending at ``pos``: a brace group, or a space-separated token."""
    if pos < len(text) and text[pos] == "{":
        depth = 0
        for i in range(pos, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
                if depth > max_depth:
                    return None
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[pos + 1 : i]
        return None  # unclosed
    match = _SPACE_FORM.match(text, pos)
    return match.group(1) if match else None
