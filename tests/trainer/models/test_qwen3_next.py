"""Qwen3-Next family (gated delta net + gated attention + MoE) on megatron-core against transformers'
Qwen3NextForCausalLM (its pure-torch delta rule, as on any machine without flash-linear-attention).

fp32 on both sides. Tolerance 1e-3 on logits of magnitude ~6: the chunked delta rule amplifies float32
rounding (its intra-chunk triangular solve multiplies by exp of decay differences), so transformers' own logits
move by ~1e-4 when its input is perturbed by 1e-7 relative (measured: ``test_reference_noise_floor``); the
fused megatron projections round differently by that much. A wrong map moves logits by ≥ 1e-1.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

from trainer.models import kernel_fallbacks
from trainer.models.build import build_gpt_model
from trainer.models.config import hf_config
from trainer.models.weight_map import hf_names, hf_to_mcore, mcore_to_hf, rules

TOLERANCE = 1e-3
SEQ = 40


def perturbed(model, randomize, seed=0):
    return randomize(build_gpt_model(model, seed=seed).eval(), seed + 1)


def full_state(gpt):
    return {k: v.detach() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}


def hf_twin(model, state):
    hf_model = AutoModelForCausalLM.from_config(hf_config(model), attn_implementation="sdpa").eval()
    assert type(hf_model).__name__ == "Qwen3NextForCausalLM"
    hf_model.load_state_dict(mcore_to_hf(state, model), strict=True)
    return hf_model


def tokens(model, seed=0):
    return torch.randint(0, model.shape.vocab, (3, SEQ), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers(matrix, groups, randomize):
    model = matrix.models["tiny-qwen3-next"]
    gpt = perturbed(model, randomize)
    hf_model = hf_twin(model, full_state(gpt))
    ids = tokens(model)
    with torch.no_grad():
        ours = gpt(ids, torch.arange(SEQ).expand(3, SEQ), None)
        theirs = hf_model(ids).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    diff = (ours - theirs).abs().max().item()
    print(f"qwen3_next max |logit diff| = {diff:.2e} (max |logit| {ours.abs().max().item():.2f})")
    assert diff < TOLERANCE


def test_reference_noise_floor(matrix, groups, randomize):
    """The tolerance's reason: transformers against itself with 1e-7 relative noise on the embeddings."""
    model = matrix.models["tiny-qwen3-next"]
    hf_model = hf_twin(model, full_state(perturbed(model, randomize)))
    embeds = hf_model.model.embed_tokens(tokens(model)).detach()
    noise = 1 + 1e-7 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        drift = (hf_model(inputs_embeds=embeds).logits - hf_model(inputs_embeds=embeds * noise).logits).abs().max()
    print(f"transformers' own drift under 1e-7 input noise = {drift.item():.2e}")
    assert 1e-6 < drift < TOLERANCE


@pytest.mark.parametrize("swap", ["in_proj b/a", "linear_qkv q/gate"])
def test_a_wrong_map_is_caught(matrix, groups, randomize, swap):
    """Swapping two sections of a fused projection (a plausible map bug) moves logits far past the tolerance."""
    model = matrix.models["tiny-qwen3-next"]
    gpt = perturbed(model, randomize)
    state = full_state(gpt)
    hf_model = hf_twin(model, state)
    with torch.no_grad():
        if swap == "in_proj b/a":
            w, nv = gpt.decoder.layers[0].self_attention.in_proj.weight, model.shape.linear_attention.value_heads
            w[-2 * nv:] = torch.cat([w[-nv:], w[-2 * nv:-nv]]).clone()
        else:
            w, half = gpt.decoder.layers[3].self_attention.linear_qkv.weight, 2 * 16  # 2 heads per group × 16
            w[:2 * half] = torch.cat([w[half:2 * half], w[:half]]).clone()
        ids = tokens(model)
        diff = (gpt(ids, torch.arange(SEQ).expand(3, SEQ), None) - hf_model(ids).logits).abs().max()
    assert diff > 100 * TOLERANCE


def test_chunked_delta_rule_equals_recurrent():
    """What runs without flash-linear-attention (megatron's torch chunked form, installed by kernel_fallbacks)
    against transformers' token-by-token recurrence, over three chunks of 64 with a ragged end."""
    kernel_fallbacks.install()
    from megatron.core.ssm import gated_delta_net

    g = torch.Generator().manual_seed(0)
    b, s, h, dk, dv = 2, 150, 3, 16, 8
    q, k = (kernel_fallbacks.l2norm(torch.randn(b, s, h, dk, generator=g)) for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=g)
    decay = -torch.rand(b, s, h, generator=g) * 0.5  # log-decay g ≤ 0
    beta = torch.rand(b, s, h, generator=g)
    chunked, _ = gated_delta_net.chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, initial_state=None,
                                                         output_final_state=False, use_qk_l2norm_in_kernel=False)
    recurrent, _ = torch_recurrent_gated_delta_rule(q, k, v, decay, beta, None, False)
    diff = (chunked - recurrent).abs().max().item()
    print(f"chunked vs recurrent gated delta rule max |diff| = {diff:.2e}")
    assert chunked.shape == recurrent.shape == (b, s, h, dv)
    assert diff < 1e-5


def test_round_trip_is_exact(matrix, groups, randomize):
    model = matrix.models["tiny-qwen3-next"]
    state = full_state(perturbed(model, randomize))
    hf = mcore_to_hf(state, model)
    assert list(hf) == hf_names(model)
    back = hf_to_mcore(hf, model)
    assert set(back) == set(state) == {r.mcore for r in rules(model)}
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_layer_pattern_and_norms(matrix, groups):
    model = matrix.models["tiny-qwen3-next"]  # 4 layers, full attention every 4th
    names = dict(build_gpt_model(model, seed=0).named_parameters())
    assert "decoder.layers.2.self_attention.in_proj.weight" in names
    assert "decoder.layers.3.self_attention.linear_qkv.weight" in names
    # zero-centred norms start at 0 (scale 1 + w); the delta net's output norm keeps a plain weight of ones
    assert not names["decoder.layers.0.input_layernorm.weight"].any()
    assert (names["decoder.layers.0.self_attention.out_norm.weight"] == 1).all()
    assert names["decoder.layers.0.mlp.shared_experts.gate_weight"].shape == (1, 64)


def test_backward_reaches_every_parameter(matrix, groups):
    """The torch delta rule (in-place chunk updates included) differentiates: every parameter gets a finite,
    non-zero gradient from one loss."""
    model = matrix.models["tiny-qwen3-next"]
    gpt = build_gpt_model(model, seed=0)
    ids = tokens(model)
    gpt(ids, torch.arange(SEQ).expand(3, SEQ), None).float().logsumexp(-1).mean().backward()
    for name, p in gpt.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_80b_config_reads_back(matrix):
    """qwen3-next-80b-a3b's config.json (as transformers writes it, plus keys the hub's file carries) gives the
    matrix shape back; the router dtype is a training setting config.json does not hold."""
    from trainer.models.families import family_of_hf

    model = matrix.models["qwen3-next-80b-a3b"]
    config = hf_config(model).to_dict() | {"use_sliding_window": False, "sliding_window": None,
                                           "router_aux_loss_coef": 0.001, "output_router_logits": False}
    shape = family_of_hf("qwen3_next").shape_from_hf(config)
    assert shape == model.shape.model_copy(update={"moe": model.shape.moe.model_copy(update={"router_dtype": "fp32"})})
    assert shape.partial_rotary_factor == 0.25 and shape.linear_attention.value_heads == 32


def test_same_seed_same_weights_after_other_builds(matrix, groups):
    """The delta net initialises under megatron's TP RNG tracker; a build must not depend on what an earlier
    build drew from it (it did: logits moved by 3e-3 depending on which tests ran first)."""
    model = matrix.models["tiny-qwen3-next"]
    first = full_state(build_gpt_model(model, seed=0))
    build_gpt_model(model, seed=5)
    again = full_state(build_gpt_model(model, seed=0))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_shared_expert_of_any_size_converts(matrix, groups, randomize):
    """config.json's shared_expert_intermediate_size need not be a multiple of moe_intermediate_size (32 here):
    megatron-core takes any size, so 48 reads, builds and gives transformers' logits."""
    from trainer.models.families import family

    tiny = matrix.models["tiny-qwen3-next"]
    shape = family("qwen3_next").shape_from_hf({**hf_config(tiny).to_dict(), "shared_expert_intermediate_size": 48})
    assert shape.moe.shared_hidden == 48
    model = tiny.model_copy(update={"shape": shape})
    gpt = perturbed(model, randomize)
    state = full_state(gpt)
    assert state["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"].shape == (64, 48)
    hf_model = hf_twin(model, state)
    assert hf_model.config.shared_expert_intermediate_size == 48
    ids = tokens(model)
    with torch.no_grad():
        diff = (gpt(ids, torch.arange(SEQ).expand(3, SEQ), None) - hf_model(ids).logits).abs().max().item()
    assert diff < TOLERANCE
