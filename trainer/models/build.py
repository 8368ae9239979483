"""Build the megatron-core ``GPTModel`` of a matrix model (dense families on this backend)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from matrix.schema import Layout, Model
from trainer.backends import cpu_compat
from trainer.models.config import require_dense, transformer_config
from trainer.models.specs import dense_layer_spec


def build_gpt_model(model: Model, *, seed: int, layout: Layout | None = None) -> GPTModel:
    """A freshly initialised ``GPTModel`` on CPU; the same seed gives the same weights.

    megatron's CPU initialisation (``use_cpu_initialization``) draws from torch's default CPU generator,
    so it is seeded here and restored afterwards. Needs ``parallel_state`` initialised (the backend does
    it; tests use a fixture). deepseek_v3 / qwen3_next raise ``NotImplementedError`` naming the family.
    """
    require_dense(model)
    cpu_compat.install()
    config = transformer_config(model, layout)
    shape = model.shape
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=dense_layer_spec(qk_norm=shape.qk_norm),
            vocab_size=shape.vocab,
            max_sequence_length=shape.max_position,
            share_embeddings_and_output_weights=shape.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=shape.rope_theta,
            rotary_percent=1.0,
            # logits of the full vocabulary on every rank (TP gathers them) for log-probs
            parallel_output=False,
        )
    finally:
        torch.set_rng_state(rng)
    return gpt
