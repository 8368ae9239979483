"""GRPO algorithm pieces as pure tensor functions, each variant registered by name.

No process groups here: the caller all-reduces the global token count (see ``aggregation.py``).
"""

from trainer.algo.advantages import (
    ADV_ESTIMATORS,
    get_adv_estimator,
    group_outcome_ratios,
    grpo_advantages,
    grpo_unbiased_advantages,
    register_adv_estimator,
)
from trainer.algo.aggregation import AGG_MODES, agg_denominator, agg_loss, global_denominator
from trainer.algo.entropy import entropy_from_logits
from trainer.algo.kl import KL_ESTIMATORS, get_kl_estimator, kl_k3, register_kl_estimator
from trainer.algo.policy_loss import (
    POLICY_LOSSES,
    dual_clip_loss,
    get_policy_loss,
    ppo_clip_loss,
    register_policy_loss,
)
from trainer.algo.registry import Registry, UnknownVariantError

__all__ = [
    "ADV_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "Registry",
    "UnknownVariantError",
    "agg_denominator",
    "agg_loss",
    "dual_clip_loss",
    "entropy_from_logits",
    "get_adv_estimator",
    "get_kl_estimator",
    "get_policy_loss",
    "global_denominator",
    "group_outcome_ratios",
    "grpo_advantages",
    "grpo_unbiased_advantages",
    "kl_k3",
    "ppo_clip_loss",
    "register_adv_estimator",
    "register_kl_estimator",
    "register_policy_loss",
]
