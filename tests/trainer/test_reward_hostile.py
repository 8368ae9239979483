"""MUST SHOW: hostile model outputs are scored 0.0 (or graded safely) within a bounded time, no crash.

The 5 s bound is a hang detector, not a performance target: every case takes milliseconds when the
bounds in ``trainer/reward`` hold, and minutes or forever (or a MemoryError) when they do not.
"""

import threading
import time

import pytest

from trainer.reward import score
from trainer.reward.grader import MATH_VERIFY_TIMEOUT_S, _sandbox

HANG_BOUND_S = 5.0
MB = 1024 * 1024

HOSTILE = {
    "megabyte_no_box": ("x" * (4 * MB), "1", 0.0),
    "megabyte_then_box": ("y" * (4 * MB) + r" \boxed{7}", "7", 1.0),  # only the tail is read
    "megabyte_inside_box": (r"\boxed{" + "1" * (2 * MB) + "}", "1", 0.0),
    "many_boxes": (r"\boxed{1}" * 200_000, "1", 1.0),
    "unclosed_brace": (r"\boxed{" + "{" * 1000 + "7", "7", 0.0),
    "unclosed_megabyte": (r"\boxed{" + "a{" * MB, "a", 0.0),
    "nesting_1000_deep": (r"\boxed{" + "{" * 1000 + "7" + "}" * 1001, "7", 0.0),
    "tower_latex": (r"\boxed{10^{10^{10^{10}}}}", "1", 0.0),
    "tower_python": (r"\boxed{9**9**9**9}", "1", 0.0),
    "huge_exponent": (r"\boxed{2^{999999999}}", "1", 0.0),
    "huge_factorial": (r"\boxed{99999999!}", "1", 0.0),
    "frac_bomb": (r"\boxed{" + r"\frac" * 100_000 + "}", "1", 0.0),
    "sqrt_bomb": (r"\boxed{" + r"\sqrt" * 100_000 + "}", "1", 0.0),
    "units_bomb": (r"\boxed{" + r"5\text{ cm}" * 5000 + "}", "5", 0.0),
    "slashes": (r"\boxed{" + "1/" * 20_000 + "1}", "1", 0.0),
    "equals_chain": (r"\boxed{" + "x=" * 20_000 + "1}", "1", 0.0),
    "nul_and_unicode": ("\x00\ufffd\U0001f600" * 10_000 + r"\boxed{\x00}", "1", 0.0),
    "lone_surrogate": ("\ud800" + r"\boxed{3}", "3", 1.0),
    "empty": ("", "1", 0.0),
    "not_a_string": (None, "1", 0.0),
}


@pytest.mark.parametrize("grader", ["hendrycks", "math-verify"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_output_scored_in_bounded_time(request, case, grader):
    if grader == "math-verify":
        request.getfixturevalue("math_verify_worker")
    response, ground_truth, expected = HOSTILE[case]
    start = time.perf_counter()
    result = score(response, ground_truth, grader=grader)
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_BOUND_S, f"{case}: {elapsed:.1f} s"
    assert result == expected


@pytest.mark.parametrize("grader", ["hendrycks", "math-verify"])
def test_hostile_ground_truth_is_bounded_too(request, grader):
    if grader == "math-verify":
        request.getfixturevalue("math_verify_worker")
    start = time.perf_counter()
    assert score(r"\boxed{1}", "9^{9^{9^{9}}}", grader=grader) == 0.0
    assert score(r"\boxed{1}", "{" * 100_000, grader=grader) == 0.0
    assert time.perf_counter() - start < HANG_BOUND_S


# Cheap to write, seconds to minutes to evaluate, and not caught by the sympy_safe screen: only the
# grader's worker deadline bounds them (issue 12.2). Measured before it: 5 s in the main thread, 9-45 s
# in a worker thread.
DEADLINE_CASES = [r"2^{1000\cdot1000\cdot1000}", r"\Gamma(10^{6})", r"\binom{10^{6}}{500000}"]
KILL_SLACK_S = 1.0  # SIGKILL + join of the worker after the deadline


@pytest.fixture(scope="module")
def math_verify_worker():
    pytest.importorskip("math_verify")
    _sandbox().warm_up()  # math-verify's import and parser set-up are paid once, outside the timed calls
    yield
    _sandbox().stop()


def _timed_scores(results: list) -> None:
    for expr in DEADLINE_CASES:
        start = time.perf_counter()
        results.append((expr, score(r"\boxed{" + expr + "}", "1", grader="math-verify"), time.perf_counter() - start))


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_math_verify_is_bounded_by_its_deadline(math_verify_worker, where):
    results: list = []
    if where == "main thread":
        _timed_scores(results)
    else:
        thread = threading.Thread(target=_timed_scores, args=(results,))
        thread.start()
        thread.join()
    assert [r[1] for r in results] == [0.0] * len(DEADLINE_CASES)
    for expr, _, elapsed in results:
        assert elapsed < MATH_VERIFY_TIMEOUT_S + KILL_SLACK_S, f"{expr}: {elapsed:.1f} s"
    # the killed worker is replaced: the next answer is graded, not refused
    assert score(r"\boxed{x^2+2x+1}", "(x+1)^2", grader="math-verify") == 1.0
