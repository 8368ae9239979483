"""Model families on megatron-core: per-family bundles (``families/``), core attention, HF↔mcore weight
rules, FLOPs per token and the builder. Dense GQA (Qwen2 / Qwen3) and MLA + MoE (DeepSeek-V3 / Moonlight).
"""
