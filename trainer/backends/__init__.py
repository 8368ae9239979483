"""Training backends the GRPO loop drives; ``megatron.MegatronBackend`` today, FSDP2 later.

``cpu_compat`` makes megatron-core run without CUDA; ``errors`` holds what a backend raises to the loop.
"""
