"""Qwen3-MoE (FSDP2 only): its transformers config both ways, the family's refusals, FLOPs by hand, the matrix's
checks, and transformers' model through the FSDP2 backend's expert hook (same values, every expert in backward)."""

import pytest
import torch

from matrix.rules import check_model
from trainer.backends.fsdp import build_hf_model, every_expert_in_backward
from trainer.models.families import BUILT_FAMILIES, family
from trainer.models.families.bundle import UnsupportedConfig
from trainer.worker import one_process


def test_config_round_trip_and_refusals(matrix):
    model = matrix.models["tiny-qwen3-moe"]
    bundle = family("qwen3_moe")
    config = bundle.hf_config(model)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 32)
    assert bundle.shape_from_hf(config.to_dict()) == model.shape
    with pytest.raises(UnsupportedConfig, match="mlp_only_layers"):
        bundle.shape_from_hf(config.to_dict() | {"mlp_only_layers": [0]})
    with pytest.raises(NotImplementedError, match="fsdp trainer only"):
        bundle.rules(model.shape)
    assert "qwen3_moe" in BUILT_FAMILIES["fsdp"] and "qwen3_moe" not in BUILT_FAMILIES["megatron"]


def test_flops_count_active_experts_only(matrix):
    shape = matrix.models["tiny-qwen3-moe"].shape
    hd, seq = 16, 48
    attention = 2 * 64 * hd * (4 + 2 + 2 + 4) + 2 * 4 * (hd + hd) * (seq + 1) / 2
    moe = 2 * 64 * 4 + 2 * 3 * 64 * 32 * 2  # router + top-2 of 4 experts
    expected = 2 * (attention + moe) + 2 * 64 * 128
    assert family("qwen3_moe").flops_per_token(shape, seq) == pytest.approx(expected)


def test_matrix_refuses_deepseek_routing_fields(matrix):
    model = matrix.models["tiny-qwen3-moe"]
    shaped = model.model_copy(update={"shape": model.shape.model_copy(
        update={"moe": model.shape.moe.model_copy(update={"shared_experts": 1})})})
    assert [msg for _, msg in check_model("m", shaped)] == ["Qwen3-MoE has no shared experts: leave it at 0"]


def test_every_expert_gets_a_gradient_and_values_are_unchanged(matrix):
    resolved = one_process(matrix.resolve("tiny-qwen3-moe-fsdp"))
    torch.manual_seed(0)
    plain = build_hf_model(resolved, on_meta=False)
    hooked = build_hf_model(resolved, on_meta=False)
    hooked.load_state_dict(plain.state_dict())
    every_expert_in_backward(hooked)
    ids = torch.tensor([[5, 6, 7]])  # 3 tokens, top-2 of 4 experts: some expert of some layer goes unused
    torch.testing.assert_close(hooked(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    plain(input_ids=ids).logits.sum().backward()
    hooked(input_ids=ids).logits.sum().backward()
    unused = [n for n, p in plain.named_parameters() if "experts" in n and p.grad is None]
    assert unused, "the example must leave an expert unused"
    assert all(p.grad is not None for p in hooked.parameters())
