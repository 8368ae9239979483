"""Which model families each trainer backend builds today (a light module: the preflight reads it
before anything imports megatron-core)."""

DENSE_FAMILIES = ("qwen2", "qwen3")
BUILT_FAMILIES = {"megatron": DENSE_FAMILIES}
