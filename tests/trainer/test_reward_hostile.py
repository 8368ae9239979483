"""MUST SHOW: hostile model outputs are scored 0.0 (or graded safely) within a bounded time, no crash.

The 5 s bound is a hang detector, not a performance target: every case takes milliseconds when the
bounds in ``trainer/reward`` hold, and minutes or forever (or a MemoryError) when they do not.
"""

import time

import pytest

from trainer.reward import score

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
def test_hostile_output_scored_in_bounded_time(case, grader):
    if grader == "math-verify":
        pytest.importorskip("math_verify")
    response, ground_truth, expected = HOSTILE[case]
    start = time.perf_counter()
    result = score(response, ground_truth, grader=grader)
    elapsed = time.perf_counter() - start
    assert elapsed < HANG_BOUND_S, f"{case}: {elapsed:.1f} s"
    assert result == expected


@pytest.mark.parametrize("grader", ["hendrycks", "math-verify"])
def test_hostile_ground_truth_is_bounded_too(grader):
    if grader == "math-verify":
        pytest.importorskip("math_verify")
    start = time.perf_counter()
    assert score(r"\boxed{1}", "9^{9^{9^{9}}}", grader=grader) == 0.0
    assert score(r"\boxed{1}", "{" * 100_000, grader=grader) == 0.0
    assert time.perf_counter() - start < HANG_BOUND_S
