"""DeepSeek-V3 family (MLA + MoE) on megatron-core against transformers' DeepseekV3ForCausalLM.

Variants of tiny-moonlight cover MLA with and without q_lora_rank, YaRN, group-limited routing and the
checkpoint's expert bias. fp32 on both sides; the tolerance 1e-4 on logits of magnitude ~3 is ~30× the
float32 rounding noise of two different operation orders (fused vs split projections, SDPA vs eager
attention, megatron's token permutation for experts vs transformers' per-expert loop); a wrong map or a
routing difference moves logits by ≥ 1e-2.
"""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from matrix.schema import YaRN
from trainer.models.build import build_gpt_model
from trainer.models.config import hf_config, transformer_config
from trainer.models.families.deepseek_v3 import RouterSettingWarning
from trainer.models.weight_map import hf_names, hf_to_mcore, mcore_to_hf, rules

TOLERANCE = 1e-4


def variant(model, *, shape=None, moe=None, mla=None):
    s = model.shape
    update = dict(shape or {})
    if moe:
        update["moe"] = s.moe.model_copy(update=moe)
    if mla:
        update["mla"] = s.mla.model_copy(update=mla)
    return model.model_copy(update={"shape": s.model_copy(update=update)})


VARIANTS = {
    "moonlight": {},  # q_lora_rank null, 2 groups × 2 experts, 1 group per token, routed scaling 2.5
    "q-lora": {"mla": {"q_lora_rank": 24}},
    "yarn": {"shape": {"rope_scaling": YaRN(factor=4.0, original_max_position=16, mscale=1.0, mscale_all_dim=1.0)}},
    "no-groups": {"moe": {"groups": 1, "group_topk": 1, "shared_experts": 2}},
}


def perturbed(model, randomize, seed=0):
    """A GPTModel with every parameter random (norms too) and a random expert bias in every router."""
    return randomize(build_gpt_model(model, seed=seed).eval(), seed + 1)


def full_state(gpt):
    return {k: v.detach() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_transformers(matrix, groups, name, randomize):
    model = variant(matrix.models["tiny-moonlight"], **VARIANTS[name])
    gpt = perturbed(model, randomize)
    hf_model = AutoModelForCausalLM.from_config(hf_config(model), attn_implementation="sdpa").eval()
    assert type(hf_model).__name__ == "DeepseekV3ForCausalLM"
    hf_model.load_state_dict(mcore_to_hf(full_state(gpt), model), strict=True)
    ids = torch.randint(0, model.shape.vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gpt(ids, torch.arange(40).expand(3, 40), None)
        theirs = hf_model(ids).logits
    assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
    diff = (ours - theirs).abs().max().item()
    print(f"deepseek_v3[{name}] max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE


def test_expert_bias_is_part_of_routing(matrix, groups, randomize):
    """Dropping the loaded expert bias changes the logits: the map carries the routing, not just weights."""
    model = matrix.models["tiny-moonlight"]
    gpt = perturbed(model, randomize)
    ids = torch.randint(0, model.shape.vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = gpt(ids, torch.arange(32).expand(2, 32), None)
        for name, b in gpt.named_buffers():
            if name.endswith("router.expert_bias"):
                b.zero_()
        after = gpt(ids, torch.arange(32).expand(2, 32), None)
    assert (before - after).abs().max() > 1e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_is_exact(matrix, groups, name, randomize):
    model = variant(matrix.models["tiny-moonlight"], **VARIANTS[name])
    state = full_state(perturbed(model, randomize))
    hf = mcore_to_hf(state, model)
    assert set(hf) - set(hf_names(model)) == {
        f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(1, model.shape.layers)
    }
    back = hf_to_mcore(hf, model)
    assert set(back) == set(state) == {r.mcore for r in rules(model)}
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_weight_sync_skips_the_bias_buffer(matrix, groups, randomize):
    """Parameters alone (what weight sync streams) map without the router's bias buffer, and load back."""
    model = matrix.models["tiny-moonlight"]
    params = {k: v.detach() for k, v in perturbed(model, randomize).named_parameters()}
    hf = mcore_to_hf(params, model.shape)
    assert list(hf) == hf_names(model.shape)
    assert set(hf_to_mcore(hf, model.shape)) == set(params)


def test_first_dense_layers_and_shared_experts(matrix, groups):
    model = matrix.models["tiny-moonlight"]  # first_dense_layers 1, shared_experts 1
    gpt = build_gpt_model(model, seed=0)
    names = dict(gpt.named_parameters())
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names and "decoder.layers.0.mlp.router.weight" not in names
    assert names["decoder.layers.1.mlp.shared_experts.linear_fc1.weight"].shape == (2 * 32, 64)
    assert "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.weight" in names


def test_rl_router_defaults_are_silent_and_other_settings_warn(matrix):
    model = matrix.models["tiny-moonlight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouterSettingWarning)
        config = transformer_config(model)
    assert config.moe_aux_loss_coeff == 0 and config.moe_router_load_balancing_type == "none"
    assert config.moe_router_bias_update_rate == 0
    risky = variant(model, moe={"router_load_balancing": "seq_aux_loss", "aux_loss_coeff": 1e-3,
                                "expert_bias": True, "bias_update_rate": 1e-3})
    with pytest.warns(RouterSettingWarning) as caught:
        config = transformer_config(risky)
    messages = [str(w.message) for w in caught if w.category is RouterSettingWarning]
    assert len(messages) == 3 and all("collapse" in m and "off-policy" in m for m in messages)
    assert config.moe_router_bias_update_rate == 1e-3
