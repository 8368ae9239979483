"""Hendrycks MATH answer normalisation and exact-match equivalence (``strip_string`` / ``is_equiv``).

Same rules, in the same order, as ``math_equivalence.py`` of hendrycks/math, which verl's
``reward_score/math.py`` and ChatLearn's MATH reward copy: the answer strings are normalised and then
compared for exact equality. No expression is evaluated, so no input can trigger big arithmetic; the
cost is linear in the answer length. Inputs the original's helpers fail on (two ``\\text{ `` units, a
``\\sqrt`` or ``\\frac`` with nothing after it) raise :class:`Unnormalizable`, and :func:`is_equiv` then falls
back to comparing the raw strings, as the original's ``try/except`` does.

One deliberate difference from ChatLearn's copy, in ``a/b``: hendrycks' ``_fix_a_slash_b`` catches every
error and keeps the string when ``a`` or ``b`` is not an integer; ChatLearn's copy catches only the
``AssertionError``, so its ``int("y")`` ``ValueError`` escapes ``strip_string`` and ``is_equiv`` compares the
raw strings. ``x = 1/y`` against the ground truth ``1/y`` therefore scores 0 under ChatLearn and 1 here.
We keep the original's (and verl's) rule: the answers are equal, and a score that depends on which
exception a helper lets through is an accident, not a grading rule. Only answers ``v = a/b`` with a
non-integer side differ; everything else matches ChatLearn.
"""

from __future__ import annotations


class Unnormalizable(ValueError):
    """The hendrycks rules cannot normalise this string (the original raises here too)."""


def _remove_right_units(s: str) -> str:
    """``"5 \\text{ cm}"`` -> ``"5 "``; in MATH, ``\\text{ `` (with a space) only ever starts a unit."""
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise Unnormalizable(f"more than one unit in {s[:80]!r}")
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (one character argument)."""
    parts = s.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise Unnormalizable("\\sqrt without an argument")
        out.append("\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:]))
    return "".join(out)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}`` (single-character arguments)."""
    parts = s.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        out.append("\\frac")
        if not part:
            raise Unnormalizable("\\frac without an argument")
        if part[0] == "{":
            out.append(part)
            continue
        if len(part) < 2:
            return s  # the original gives up and keeps the string
        a, b, rest = part[0], part[1], part[2:]
        out.append("{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest))
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """``"3/4"`` -> ``"\\frac{3}{4}"`` when both sides are plain integers written canonically; else unchanged
    (hendrycks / verl; ChatLearn raises on a non-integer side, see the module docstring)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def strip_string(s: str) -> str:
    """Normalise one answer string by the hendrycks rules; may raise :class:`Unnormalizable`."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")  # degrees
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")  # ".5" -> "0.5" after a space or brace
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs_rhs = s.split("=")
    if len(lhs_rhs) == 2 and len(lhs_rhs[0]) <= 2:  # "x = 5" -> "5", "k=3" -> "3"
        s = lhs_rhs[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks exact match after :func:`strip_string`; raw equality if either cannot be normalised.

    ``None`` (no answer found) matches nothing, not even another ``None``.
    """
    if a is None or b is None:
        return False
    try:
        return strip_string(a) == strip_string(b)
    except Unnormalizable:
        return a == b
