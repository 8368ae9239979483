"""Rule rewards for boxed math answers (hendrycks MATH parity), bounded against hostile outputs."""

from trainer.reward.extract import last_boxed
from trainer.reward.grader import (
    GRADERS,
    GraderUnavailableError,
    get_grader,
    register_grader,
    score,
    sympy_safe,
)
from trainer.reward.normalize import is_equiv, strip_string

__all__ = [
    "GRADERS",
    "GraderUnavailableError",
    "get_grader",
    "is_equiv",
    "last_boxed",
    "register_grader",
    "score",
    "strip_string",
    "sympy_safe",
]
