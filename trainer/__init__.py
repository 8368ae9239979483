"""The bundled GRPO trainer (megatron-core, CPU and GPU)."""
