"""Build the megatron-core ``GPTModel`` of a matrix model (dense families on this backend)."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from matrix.schema import Layout, Model
from trainer.backends import cpu_compat
from trainer.models.config import require_dense, torch_dtype, transformer_config
from trainer.models.specs import dense_layer_spec
from trainer.parallel import pp
from trainer.parallel.tp import padded_vocab


def build_gpt_model(model: Model, *, seed: int, layout: Layout | None = None, pre_process: bool | None = None,
                    post_process: bool | None = None) -> GPTModel:
    """A freshly initialised ``GPTModel`` (this rank's TP/PP/EP part) on CPU; the same seed gives the same weights.

    The output layer keeps its logits vocab-parallel (``trainer.parallel.tp`` turns them into log-probs);
    the vocabulary is padded to a multiple of TP. ``pre_process`` / ``post_process`` default to whether this
    rank is the first / last pipeline stage.

    megatron's CPU initialisation (``use_cpu_initialization``) draws from torch's default CPU generator,
    so it is seeded here and restored afterwards. Needs ``parallel_state`` initialised (the backend does
    it; tests use a fixture). deepseek_v3 / qwen3_next raise ``NotImplementedError`` naming the family.
    """
    require_dense(model)
    cpu_compat.install()
    layout = layout or Layout()
    config = dataclasses.replace(
        transformer_config(model, layout),
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_dtype=torch_dtype(model),
        **pp.SCHEDULE_CONFIG,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    shape = model.shape
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=dense_layer_spec(qk_norm=shape.qk_norm),
            vocab_size=padded_vocab(shape.vocab, layout.tp),
            max_sequence_length=shape.max_position,
            share_embeddings_and_output_weights=shape.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=shape.rope_theta,
            rotary_percent=1.0,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
        )
    finally:
        torch.set_rng_state(rng)
    return gpt
