"""Layout-equivalence gates: one saved rollout replayed by a reference and candidate layouts, compared per token."""
