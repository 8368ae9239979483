"""Layer specs: the tiny dense models have exactly the parameters a hand count gives, and no family takes a
provider's norm-fused linear beside its own norms."""

import dataclasses

import pytest
import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from matrix.schema import Layout
from trainer.models.attention import SDPACoreAttention
from trainer.models.build import build_gpt_model
from trainer.models.config import head_dim
from trainer.models.families import family
from trainer.models.specs import TorchNorm, TorchSpecProvider


def hand_count(shape) -> int:
    """Embedding + per layer (2 norms, fused QKV (+bias), QK-norms, o-proj, SwiGLU fc1/fc2) + final norm + head."""
    h, f, hd = shape.hidden, shape.ffn_hidden, head_dim(shape)
    qkv_rows = (shape.heads + 2 * shape.query_groups) * hd
    layer = 2 * h + qkv_rows * h + shape.heads * hd * h + 2 * f * h + f * h
    layer += qkv_rows if shape.qkv_bias else 0
    layer += 2 * hd if shape.qk_norm else 0
    head = 0 if shape.tie_embeddings else shape.vocab * h
    return shape.vocab * h + shape.layers * layer + h + head


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-qwen3"])
def test_parameter_count_matches_hand_formula(matrix, groups, name):
    model = matrix.models[name]
    gpt = build_gpt_model(model, seed=0)
    assert sum(p.numel() for p in gpt.parameters()) == hand_count(model.shape)
    attn = gpt.decoder.layers[0].self_attention
    assert isinstance(attn.core_attention, SDPACoreAttention)
    assert (attn.linear_qkv.bias is not None) == model.shape.qkv_bias
    assert hasattr(attn.q_layernorm, "weight") == model.shape.qk_norm


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-qwen3"])
def test_parameter_count_matches_transformers(matrix, groups, name):
    """The megatron model has exactly as many weights as the HF model the engine loads (weight sync 1:1)."""
    from transformers import AutoModelForCausalLM

    from trainer.models.config import hf_config

    model = matrix.models[name]
    hf = AutoModelForCausalLM.from_config(hf_config(model))
    assert sum(p.numel() for p in build_gpt_model(model, seed=0).parameters()) == hf.num_parameters()


def test_same_seed_same_weights(matrix, groups):
    a = build_gpt_model(matrix.models["tiny-qwen3"], seed=5).state_dict()
    b = build_gpt_model(matrix.models["tiny-qwen3"], seed=5).state_dict()
    c = build_gpt_model(matrix.models["tiny-qwen3"], seed=6).state_dict()
    weights = [k for k in a if k.endswith("weight")]
    assert all((a[k] == b[k]).all() for k in weights)
    assert not (a["embedding.word_embeddings.weight"] == c["embedding.word_embeddings.weight"]).all()


class NormFusedLinear:
    """Stands for Transformer Engine's ``TELayerNormColumnParallelLinear`` (a column-parallel linear with its own
    norm weight); only ever compared against, never built."""


class NormFusingProvider(TorchSpecProvider):
    """The CPU provider answering the two questions as Transformer Engine's provider does (TE itself does not
    install here): it fuses norms into linears, and this is its fused module."""

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return NormFusedLinear


def module_classes(spec) -> set:
    """Every module class named anywhere in a (nested) megatron spec."""
    if isinstance(spec, type):
        return {spec}
    if isinstance(spec, ModuleSpec):
        return module_classes(spec.module) | module_classes(spec.submodules)
    if isinstance(spec, (list, tuple)):
        return set().union(*map(module_classes, spec))
    if dataclasses.is_dataclass(spec):
        return set().union(*(module_classes(getattr(spec, f.name)) for f in dataclasses.fields(spec)))
    return set()


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next"])
def test_no_family_takes_a_norm_fused_linear_beside_its_own_norms(matrix, groups, name):
    """Every layer has its own input and pre-MLP norms (the HF names map onto them), so a provider's norm-fused
    linear would normalise twice and hold a weight nothing maps: a family must ask for plain linears whatever
    the provider fuses. (megatron's ``get_mlp_module_spec_for_backend`` takes the fused one under TE.)"""
    model = matrix.models[name]
    bundle = family(model.family)
    config = bundle.transformer_config(model, Layout())
    specs = bundle.layer_specs(model, config, NormFusingProvider())
    found = module_classes(specs)
    assert NormFusedLinear not in found and TorchNorm in found


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next"])
def test_every_parameter_and_buffer_ends_on_the_platforms_device(matrix, groups, name):
    """megatron places only its own layers on the current device; the torch norms, duplicated down projections,
    routers and shared-expert gates are made on the host, so the builder moves the whole model. A platform whose
    device is "meta" (initialising on the host, as the CPU one does) shows where each tensor ends."""
    from trainer.platform import CpuPlatform

    class MetaDevicePlatform(CpuPlatform):
        device = torch.device("meta")

    gpt = build_gpt_model(matrix.models[name], seed=0, platform=MetaDevicePlatform())
    left = [n for n, t in [*gpt.named_parameters(), *gpt.named_buffers()] if t.device.type != "meta"]
    assert left == []
