"""Model families on megatron-core: configs, layer specs, core attention, HF↔mcore weight maps, builders.

Dense GQA (Qwen2 / Qwen3) today; MLA + MoE (DeepSeek-V3) and the Qwen3-Next hybrid add their own spec and
weight-map rules beside these.
"""
