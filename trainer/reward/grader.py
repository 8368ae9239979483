"""Rule rewards for math answers: ``score(response, ground_truth, grader) -> 1.0 | 0.0``.

Graders are registered by name and compare an extracted answer with the ground truth:

* ``"hendrycks"`` (default; ChatLearn / verl MATH parity): normalised exact match
  (:mod:`trainer.reward.normalize`). Pure string work, linear in the (bounded) answer length. It differs
  from ChatLearn on one form, ``v = a/b`` with a non-integer side (``x = 1/y`` vs ``1/y``: 1 here, 0 in
  ChatLearn), where it follows hendrycks/verl; ``normalize.py`` says why.
* ``"math-verify"``: symbolic equivalence via the ``math-verify`` package (HuggingFace), imported only
  when this grader is selected.

Bounds on hostile outputs (a reward must never crash or stall a training step): only the last 64 KiB of
a response are searched, boxes nested deeper than 64 are refused (``extract.py``), and before any
sympy parsing :func:`sympy_safe` refuses long answers, exponent towers (``10^{10^{10}}``,
``9**9**9**9``), huge integer exponents and huge factorials. The screen cannot know every expensive
form (``2^{1000\\cdot1000\\cdot1000}``, ``\\Gamma(10^6)``, ``\\binom{10^6}{500000}`` pass it), so
math-verify runs in a worker process that is killed after ``MATH_VERIFY_TIMEOUT_S`` (``sandbox.py``):
math-verify's own ``signal.alarm`` timeouts work only in the main thread and cannot interrupt one long
C-level big-integer operation. Every ``score`` call with math-verify returns within that deadline (plus
a fork after a kill); the first lookup of the grader pays the import and parser set-up of math-verify.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable

from trainer.algo.registry import Registry
from trainer.reward.extract import MAX_RESPONSE_CHARS, last_boxed
from trainer.reward.normalize import is_equiv
from trainer.reward.sandbox import Sandbox

logger = logging.getLogger(__name__)

GRADERS = Registry("grader")
register_grader = GRADERS.register

SYMPY_MAX_CHARS = 1000  # MATH ground truths are far shorter; longer "answers" are not worth parsing
MAX_EXPONENT = 10_000  # 2^10000 has 3011 digits: cheap; 9^(9^9) has 3.7e8 digits: a stall
MAX_FACTORIAL_DIGITS = 4  # 9999! is fast; 10^5! is not
MATH_VERIFY_TIMEOUT_S = 2.0  # math-verify takes milliseconds on real answers; beyond this a worker is killed

_POWER = re.compile(r"\^|\*\*")
_TOKEN = re.compile(r"\s*([-+]?[\w.\\]+)")
_FACTORIAL = re.compile(r"(\d+)\s*!")


class GraderUnavailableError(ImportError):
    """The selected grader needs a package that is not installed; the message names the pip command."""


def _operand(expr: str, pos: int) -> tuple[str, int]:
    """The exponent operand starting at ``pos`` (brace/paren group or token) and the index after it."""
    rest = expr[pos:].lstrip()
    start = len(expr) - len(rest)
    if rest[:1] in ("{", "("):
        opener = rest[0]
        closer = "}" if opener == "{" else ")"
        depth = 0
        for i in range(start, len(expr)):
            if expr[i] == opener:
                depth += 1
            elif expr[i] == closer:
                depth -= 1
            if depth == 0:
                return expr[start + 1 : i], i + 1
        return expr[start:], len(expr)  # unbalanced: the whole rest is the operand
    match = _TOKEN.match(expr, start)
    return (match.group(1), match.end()) if match else ("", start)


def sympy_safe(expr: str, max_chars: int = SYMPY_MAX_CHARS) -> bool:
    """Whether ``expr`` is small enough to hand to a symbolic parser/evaluator without risk of a stall."""
    if len(expr) > max_chars:
        return False
    if any(len(m.group(1)) > MAX_FACTORIAL_DIGITS for m in _FACTORIAL.finditer(expr)):
        return False
    for power in _POWER.finditer(expr):
        operand, end = _operand(expr, power.end())
        if _POWER.search(operand) or _POWER.match(expr[end:].lstrip()):
            return False  # a tower: the exponent itself is a power, or the power is chained
        digits = operand.strip().lstrip("+-")
        if digits.isdigit() and (len(digits) > 6 or int(digits) > MAX_EXPONENT):
            return False
    return True


@register_grader("hendrycks")
def hendrycks_grader(answer: str, ground_truth: str) -> bool:
    """Hendrycks MATH normalised exact match (ChatLearn / verl ``math.compute_score``)."""
    return is_equiv(answer, ground_truth)


@register_grader("math-verify")
def math_verify_grader(answer: str, ground_truth: str, timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> bool:
    """Symbolic equivalence with ``math_verify.verify`` after the :func:`sympy_safe` screen.

    Runs in a worker process killed after ``timeout_s`` (``sandbox.py``), so the call is bounded in any
    thread; raises ``DeadlineExceeded`` then (``score`` counts it 0).
    """
    _import_math_verify()
    if not (sympy_safe(answer) and sympy_safe(ground_truth)):
        return False
    return bool(_sandbox().call(_math_verify_equal, answer, ground_truth, timeout_s=timeout_s))


def _math_verify_equal(answer: str, ground_truth: str) -> bool:
    """In the sandbox worker: parse both and compare. The worker's deadline is the time bound, so
    math-verify's own ``signal.alarm`` timeouts are off (and its warnings about that silenced)."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    gold = math_verify.parse("\\boxed{" + ground_truth + "}", parsing_timeout=None)
    pred = math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=None)
    return bool(gold and pred and math_verify.verify(gold, pred, timeout_seconds=None))


_SANDBOX: list[Sandbox] = []
_SANDBOX_LOCK = threading.Lock()


def _sandbox() -> Sandbox:
    """The process's math-verify worker. Parsing and comparing once here first imports what math-verify and
    sympy load lazily (a second or more), which every forked worker then inherits instead of repeating."""
    with _SANDBOX_LOCK:  # one per process, even when the first rewards are scored from several threads
        if not _SANDBOX:
            _math_verify_equal("x^2+2x+1", "(x+1)^2")
            _math_verify_equal("\\frac{1}{2}", "0.5")
            _SANDBOX.append(Sandbox())
        return _SANDBOX[0]


def _import_math_verify():
    """Import ``math_verify`` or raise :class:`GraderUnavailableError` with the install command."""
    try:
        return importlib.import_module("math_verify")
    except ImportError as exc:
        raise GraderUnavailableError(
            "grader 'math-verify' needs the math-verify package: pip install math-verify "
            "(or pip install 'grpo-stack[grading]'); the default grader 'hendrycks' needs nothing"
        ) from exc


def get_grader(name: str = "hendrycks") -> Callable[[str, str], bool]:
    """The grader registered as ``name``; fails now (not at the first reward) if its package is missing.

    For math-verify the first lookup also starts the grading worker (seconds of imports), so a caller that
    looks the grader up before its first episode keeps that cost out of the first reward.
    """
    fn = GRADERS.get(name)
    if fn is math_verify_grader:
        _import_math_verify()
        _sandbox().warm_up()
    return fn


def score(
    response: str, ground_truth: str | None, grader: str = "hendrycks", max_chars: int = MAX_RESPONSE_CHARS
) -> float:
    """1.0 if the last boxed answer of ``response`` equals ``ground_truth`` under ``grader``, else 0.0.

    A missing or unparseable answer, and any error inside the grader, score 0.0; an unknown or
    uninstalled grader raises.
    """
    grade = get_grader(grader)
    answer = last_boxed(response, max_chars=max_chars)
    if answer is None or ground_truth is None:
        return 0.0
    try:
        return 1.0 if grade(answer, ground_truth) else 0.0
    except Exception:  # a reward bug must cost one sample, not the run
        logger.debug("grader %r failed on answer %.200r", grader, answer, exc_info=True)
        return 0.0
