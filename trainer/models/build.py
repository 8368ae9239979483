"""Build the megatron-core ``GPTModel`` of a matrix model; the family bundle supplies what differs."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from matrix.schema import Layout, Model
from trainer.backends import cpu_compat
from trainer.models.families import family


def build_gpt_model(
    model: Model,
    *,
    seed: int,
    layout: Layout | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:
    """A freshly initialised ``GPTModel`` on CPU; the same seed gives the same weights.

    megatron's CPU initialisation (``use_cpu_initialization``) draws from torch's default CPU generator,
    so it is seeded here and restored afterwards. Needs ``parallel_state`` initialised (the backend does
    it; tests use a fixture). A family with no bundle raises ``NotImplementedError`` naming it.
    """
    bundle = family(model.family)
    cpu_compat.install()
    config = bundle.transformer_config(model, layout)
    shape = model.shape
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=bundle.layer_specs(model, config),
            vocab_size=shape.vocab,
            max_sequence_length=shape.max_position,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=shape.tie_embeddings,
            **bundle.gpt_kwargs(model),
            # logits of the full vocabulary on every rank (TP gathers them) for log-probs
            parallel_output=False,
        )
    finally:
        torch.set_rng_state(rng)
    return gpt
