"""Build the megatron-core ``GPTModel`` of a matrix model; the family bundle supplies what differs."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel

from matrix.schema import Layout, Model
from trainer.models.families import family
from trainer.parallel.tp import padded_vocab
from trainer.platform import CPU, Platform, Precision

# recipe run.recompute → megatron's config. "full": keep each layer's input only and recompute the whole layer in
# backward (the DeepSeek-V3 recipe's setting); "selective": recompute core attention only (megatron's default
# module list), the memory-heavy, compute-light part.
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def build_gpt_model(model: Model, *, seed: int, layout: Layout | None = None, pre_process: bool | None = None,
                    post_process: bool | None = None, recompute: str = "none", platform: Platform = CPU,
                    precision: Precision | None = None, materialize: bool = True) -> GPTModel:
    """A freshly initialised ``GPTModel`` (this rank's TP/PP/EP part) on the platform's device, its parameters
    in ``precision`` (default: the model's dtype); the same seed gives the same weights.

    The output layer keeps its logits vocab-parallel (``trainer.parallel.tp`` turns them into log-probs);
    the vocabulary is padded to a multiple of TP. ``pre_process`` / ``post_process`` default to whether this
    rank is the first / last pipeline stage.

    The platform says where megatron initialises (on the host with the CPU platform: torch's default
    generator, seeded here and restored afterwards), the dtype, the MoE dispatch and the spec provider.
    ``materialize=False``: the parameters on the meta device, where initialising them computes nothing (their
    shapes and megatron's attributes only: what a sharded conversion needs of a model it fills from a
    checkpoint, without holding a random one beside it).

    Needs ``parallel_state`` initialised (the backend does it; tests use a fixture). A family with no bundle
    raises ``NotImplementedError`` naming it.
    """
    bundle = family(model.family)
    platform.install()
    layout = layout or Layout()
    config = bundle.transformer_config(model, layout)
    precision = precision or model.dtype
    config = dataclasses.replace(config, **RECOMPUTE[recompute], **platform.megatron_fields(
        precision, moe=bool(config.num_moe_experts)))
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    shape = model.shape
    # Some modules (the gated delta net) initialise under megatron's TP RNG tracker: it is seeded from the same
    # seed for the build and given back its earlier states afterwards, so a build never depends on what an
    # earlier build (or dropout) drew from it.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker_states = tracker.get_states() if tracker.is_initialized() else None
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        with contextlib.nullcontext() if materialize else torch.device("meta"):
            gpt = GPTModel(
                config=config,
                transformer_layer_spec=bundle.layer_specs(model, config, platform.spec_provider(precision)),
                vocab_size=padded_vocab(shape.vocab, layout.tp),
                max_sequence_length=shape.max_position,
                pre_process=pre_process,
                post_process=post_process,
                share_embeddings_and_output_weights=shape.tie_embeddings,
                **bundle.gpt_kwargs(model),
                parallel_output=True,
            )
    finally:
        torch.set_rng_state(rng)
        if tracker_states is not None:
            tracker.set_states(tracker_states)
    # megatron places only its own layers on the current device (its training loop moves the whole model, which
    # core leaves to the caller): torch norms, the duplicated down projections, routers and shared-expert gates
    # are made on the host. Module.to keeps every parameter object, and so megatron's attributes on it.
    if materialize:
        gpt.to(platform.device)
    _mark_expert_parameters(gpt)
    return gpt


def _mark_expert_parameters(model: torch.nn.Module) -> None:
    """Mark every expert weight as megatron marks them under EP (``allreduce = False``), whatever the layout.

    megatron-core 0.16.1 sets ``allreduce = False`` only when EP > 1, but with ETP < TP (say TP 2, ETP 1, EP 1)
    the TP ranks are also expert-data-parallel replicas that saw different tokens: expert gradients must be
    summed over the expert-data-parallel group, not the dense one, and counted once in the grad norm over the
    expert grid. Every consumer (``parallel.dp``, ``parallel.gather``, the grad norm) reads this one flag.
    """
    for module in model.modules():
        if getattr(module, "is_expert", False):
            for p in module.parameters(recurse=False):
                p.allreduce = False
