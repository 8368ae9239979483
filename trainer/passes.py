"""Which forward passes an episode runs besides the training forward: decided here, once, from the recipe.

* **Old log-probs.** PPO's ratio divides by the policy that sampled. With exactly one optimizer step per
  episode and a deterministic training forward (no dropout, no router jitter), that policy *is* the one the
  training forward runs, on the same tokens: the detached log-probs of the training forward are the old
  log-probs, the ratio is exactly 1, and the loss and gradient are those of the separate pass (to float
  rounding; ``tests/trainer/test_passes.py``). The backend returns them from ``train_step`` so the rollout–
  trainer mismatch metrics and the equivalence gates still see them, and ``grpo.tis_cap``'s weights
  p_old / p_engine use them too: they are the log-probs of the weights the engine sampled with, as the
  separate pass's would be. More steps per episode (the policy moves between steps) or a stochastic forward
  (two forwards differ) keep the separate no-grad pass.
* **Reference log-probs.** The loss needs them when ``kl_coef`` > 0; with ``kl_coef`` 0 they only feed the
  logged ``loss/kl``, so the reference model is built and run only when ``grpo.log_reference_kl`` asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from matrix import ResolvedRecipe


@dataclass(frozen=True)
class Passes:
    old_logprobs: bool = True
    """A separate no-grad pass of the policy before the train steps; False → taken from the training forward."""
    reference: bool = True
    """A reference model, and its log-prob pass each episode (``ref_logprobs``, ``loss/kl``)."""


ALL_PASSES = Passes()  # textbook GRPO: a separate old-log-prob pass and a reference model


def stochastic_forward(r: ResolvedRecipe) -> bool:
    """Whether two training-mode forwards of the same weights can differ (dropout, MoE input jitter): the
    recipe's training backend says, from the model it would build (the matrix has no dropout field)."""
    from trainer.backends.base import backend_class

    return backend_class(r.recipe.trainer).stochastic_forward(r)


def passes(r: ResolvedRecipe) -> Passes:
    """The passes recipe ``r`` needs (see the module docstring)."""
    grpo = r.recipe.grpo
    return Passes(old_logprobs=grpo.steps_per_episode > 1 or stochastic_forward(r),
                  reference=grpo.kl_coef > 0 or bool(grpo.log_reference_kl))
