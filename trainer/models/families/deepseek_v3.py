"""DeepSeek-V3 / Moonlight: multi-head latent attention (MLA) and MoE with shared experts.

MLA with or without a q low-rank path (``q_lora_rank``), the decoupled rope head dim, optional YaRN; MoE
with sigmoid scores, the checkpoint's expert bias, group-limited routing (``groups`` / ``group_topk``), a
routed scaling factor, shared experts and ``first_dense_layers`` dense layers first. Local megatron-core
modules with the project's core attention (q/k head dim nope + rope ≠ v head dim) and the "allgather"
token dispatcher (the one that runs on gloo).

Layer ``i`` (megatron ← → HF ``model.layers.i.``), experts ``e`` by global index:

    input_layernorm.weight                          input_layernorm.weight
    self_attention.linear_q_proj.weight             self_attn.q_proj.weight               (no q_lora_rank)
    self_attention.linear_q_down_proj.weight        self_attn.q_a_proj.weight             (q_lora_rank)
    self_attention.q_layernorm.weight               self_attn.q_a_layernorm.weight        (q_lora_rank)
    self_attention.linear_q_up_proj.weight          self_attn.q_b_proj.weight             (q_lora_rank)
    self_attention.linear_kv_down_proj.weight       self_attn.kv_a_proj_with_mqa.weight
    self_attention.kv_layernorm.weight              self_attn.kv_a_layernorm.weight
    self_attention.linear_kv_up_proj.weight         self_attn.kv_b_proj.weight
    self_attention.linear_proj.weight               self_attn.o_proj.weight
    pre_mlp_layernorm.weight                        post_attention_layernorm.weight
    mlp.linear_fc1/2.weight                         mlp.{gate,up}/down_proj.weight        (i < first_dense_layers)
    mlp.router.weight                               mlp.gate.weight
    mlp.router.expert_bias        (buffer)          mlp.gate.e_score_correction_bias
    mlp.experts.local_experts.e.linear_fc1/2.weight mlp.experts.e.{gate,up}/down_proj.weight
    mlp.shared_experts.linear_fc1/2.weight          mlp.shared_experts.{gate,up}/down_proj.weight

Both sides lay out MLA the same way (q heads [nope | rope], kv_down [latent | rope], kv_up heads
[k nope | v], rope dims interleaved in the weights), so every attention tensor maps one to one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from transformers import DeepseekV3Config

from matrix.schema import MLA, Layout, Model, MoE, Shape, YaRN
from trainer.models import flops
from trainer.models.families.bundle import (
    FamilyBundle,
    HFConfigReader,
    UnsupportedConfig,
    cpu_config_kwargs,
    hf_common_kwargs,
    moe_config_kwargs,
)
from trainer.models.families.dense import dense_mlp_spec, layer_norm_rules, pre_norm_layer
from trainer.models.weight_map import Rule, embedding_rules, one_to_one, swiglu_rules


class RouterSettingWarning(UserWarning):
    """A recipe turned on a router setting that RL runs keep off."""


def router_warnings(moe: MoE) -> list[str]:
    """Why each non-default router setting is risky in RL (REFERENCE §6); empty for the RL defaults."""
    risk = (
        "it changes which experts a token uses between rollout and training, so the policy becomes "
        "off-policy and can collapse (Moonlight's eval accuracy fell from ~0.68 to ~0.15 with "
        "seq_aux_loss + expert bias); the RL default is off"
    )
    out = []
    if moe.router_load_balancing != "none":
        out.append(f"moe.router_load_balancing: {moe.router_load_balancing}: {risk}")
    if moe.aux_loss_coeff > 0:
        out.append(f"moe.aux_loss_coeff: {moe.aux_loss_coeff}: {risk}")
    if moe.expert_bias:
        out.append(f"moe.expert_bias: true (updated at rate {moe.bias_update_rate}): {risk}")
    elif moe.bias_update_rate > 0:
        out.append(f"moe.bias_update_rate: {moe.bias_update_rate} has no effect while moe.expert_bias is false")
    return out


def _moe_layer_pattern(shape: Shape) -> list[int]:
    return [0 if i < shape.moe.first_dense_layers else 1 for i in range(shape.layers)]


def transformer_config(model: Model, layout: Layout | None = None) -> MLATransformerConfig:
    shape = model.shape
    mla, moe, yarn = shape.mla, shape.moe, shape.rope_scaling
    for message in router_warnings(moe):
        warnings.warn(message, RouterSettingWarning, stacklevel=2)
    rope = (
        dict(rope_type="rope")
        if yarn is None
        else dict(
            rope_type="yarn",
            rotary_scaling_factor=yarn.factor,
            original_max_position_embeddings=yarn.original_max_position,
            beta_fast=yarn.beta_fast,
            beta_slow=yarn.beta_slow,
            mscale=yarn.mscale,
            mscale_all_dim=yarn.mscale_all_dim,
        )
    )
    grouped = moe.groups > 1
    return MLATransformerConfig(
        **cpu_config_kwargs(model, layout),
        **moe_config_kwargs(moe),
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_nope_head_dim,
        qk_pos_emb_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        qk_layernorm=True,  # MLA's q_a / kv_a latent norms
        rotary_base=shape.rope_theta,
        # the softmax scale's YaRN factor only applies with YaRN (rope_type "rope" ignores the fields)
        **({"mscale_all_dim": 0.0} | rope),
        moe_layer_freq=_moe_layer_pattern(shape),
        moe_router_score_function="sigmoid",
        # the checkpoint's bias routes (as in transformers); it is updated only when expert_bias is on
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=moe.bias_update_rate if moe.expert_bias else 0.0,
        moe_router_num_groups=moe.groups if grouped else None,
        moe_router_group_topk=moe.group_topk if grouped else None,
        moe_router_topk_scaling_factor=moe.routed_scaling,
    )


def _mla_spec(backend: BackendSpecProvider) -> ModuleSpec:
    norm = backend.layer_norm(rms_norm=True, for_qk=True)
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=backend.column_parallel_linear(),
            linear_q_down_proj=backend.linear(),  # whole weight on every TP rank: specs.DuplicatedLinear
            linear_q_up_proj=backend.column_parallel_linear(),
            linear_kv_down_proj=backend.linear(),
            linear_kv_up_proj=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=norm,
            kv_layernorm=norm,
        ),
    )


def layer_specs(model: Model, config: MLATransformerConfig, backend: BackendSpecProvider) -> TransformerBlockSubmodules:
    """Dense-MLP layers first, MoE layers after; sliced to this pipeline stage's layers."""
    attention = _mla_spec(backend)
    dense = pre_norm_layer(backend, attention, dense_mlp_spec(backend))
    moe = pre_norm_layer(
        backend, attention, get_moe_module_spec_for_backend(backend=backend, num_experts=config.num_moe_experts,
                                          moe_grouped_gemm=config.moe_grouped_gemm)
    )
    every = [moe if is_moe else dense for is_moe in _moe_layer_pattern(model.shape)]
    offset = get_transformer_layer_offset(config)
    return TransformerBlockSubmodules(
        layer_specs=every[offset : offset + get_num_layers_to_build(config)],
        layer_norm=backend.layer_norm(rms_norm=True),
    )


def gpt_kwargs(model: Model) -> dict:
    # MLA builds its own rotary embedding (rope or YaRN) from the config; GPTModel adds none.
    return dict(position_embedding_type="rope", rotary_base=model.shape.rope_theta, rotary_percent=1.0)


def hf_config(model: Model) -> DeepseekV3Config:
    shape = model.shape
    mla, moe, yarn = shape.mla, shape.moe, shape.rope_scaling
    if moe.groups > 1 and moe.topk // moe.group_topk != 2:
        # transformers scores a group by its top-2 experts, megatron by its top (topk / group_topk).
        raise ValueError(f"group-limited routing needs topk / group_topk = 2, got {moe.topk} / {moe.group_topk}")
    return DeepseekV3Config(
        **hf_common_kwargs(model),
        moe_intermediate_size=moe.ffn_hidden,
        n_shared_experts=moe.shared_experts,
        n_routed_experts=moe.experts,
        routed_scaling_factor=moe.routed_scaling,
        kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        n_group=moe.groups,
        topk_group=moe.group_topk,
        num_experts_per_tok=moe.topk,
        first_k_dense_replace=moe.first_dense_layers,
        norm_topk_prob=True,
        rope_scaling=None
        if yarn is None
        else {
            "rope_type": "yarn",
            "factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_max_position,
            "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow,
            "mscale": yarn.mscale,
            "mscale_all_dim": yarn.mscale_all_dim,
        },
        rope_interleave=True,
        attention_bias=False,
        # what the checkpoints' config.json say and shape_from_hf expects; transformers' class has no such fields,
        # but vLLM's DeepSeek model reads them (an engine built from this config would not start without them)
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
        num_nextn_predict_layers=0,
    )


def _read_yarn(reader: HFConfigReader) -> YaRN | None:
    scaling = reader.get("rope_scaling")
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise UnsupportedConfig("rope_scaling", f"type {kind!r} is not supported (yarn or none)")
    extra = sorted(set(scaling) - {"rope_type", "type", "factor", "original_max_position_embeddings",
                                   "beta_fast", "beta_slow", "mscale", "mscale_all_dim"})
    if extra:
        raise UnsupportedConfig("rope_scaling", f"key {extra[0]!r} is not supported")
    mscale, mscale_all_dim = scaling.get("mscale") or 1.0, scaling.get("mscale_all_dim") or 0.0
    if mscale != 1.0 and not mscale_all_dim:
        raise UnsupportedConfig("rope_scaling", "mscale without mscale_all_dim is not supported")
    return YaRN(
        factor=float(scaling["factor"]),
        original_max_position=scaling.get("original_max_position_embeddings")
        or reader.config["max_position_embeddings"],
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        mscale=float(mscale),
        mscale_all_dim=float(mscale_all_dim),
    )


def shape_from_hf(config: Mapping) -> Shape:
    reader = HFConfigReader(config)
    fields = reader.common_shape()
    reader.expect("norm_topk_prob", [True], "megatron normalises the top-k sigmoid scores")
    reader.expect("rope_interleave", [True], "megatron's MLA rope takes interleaved rope dims")
    reader.expect("attention_bias", [False], "MLA projections have no bias")
    reader.expect("scoring_func", ["sigmoid"], "DeepSeek-V3 routing is sigmoid")
    reader.expect("topk_method", ["noaux_tc"], "bias-corrected group-limited top-k")
    reader.expect("moe_layer_freq", [1], "every layer after the first dense ones is MoE")
    reader.expect(
        "num_nextn_predict_layers", [0], "multi-token prediction is not trained; prepare with "
        "set-config num_nextn_predict_layers: 0"
    )
    for pretraining_only in ("aux_loss_alpha", "seq_aux", "ep_size", "head_dim", "qk_head_dim"):
        reader.get(pretraining_only)  # pretraining / inference settings; the recipe's router settings rule
    topk, groups, group_topk = (reader.require(k) for k in ("num_experts_per_tok", "n_group", "topk_group"))
    if groups > 1 and topk // group_topk != 2:
        raise UnsupportedConfig("topk_group", f"num_experts_per_tok / topk_group must be 2, got {topk}/{group_topk}")
    shape = Shape(
        **fields,
        rope_scaling=_read_yarn(reader),
        moe=MoE(
            experts=reader.require("n_routed_experts"),
            topk=topk,
            ffn_hidden=reader.require("moe_intermediate_size"),
            shared_experts=reader.get("n_shared_experts") or 0,
            first_dense_layers=reader.get("first_k_dense_replace", 0),
            groups=groups,
            group_topk=group_topk,
            routed_scaling=float(reader.get("routed_scaling_factor", 1.0)),
        ),
        mla=MLA(
            q_lora_rank=reader.get("q_lora_rank"),
            kv_lora_rank=reader.require("kv_lora_rank"),
            qk_nope_head_dim=reader.require("qk_nope_head_dim"),
            qk_rope_head_dim=reader.require("qk_rope_head_dim"),
            v_head_dim=reader.require("v_head_dim"),
        ),
    )
    reader.leftover()
    return shape


def _mla_rules(shape: Shape, m: str, h: str) -> list[Rule]:
    a, s = f"{m}self_attention.", f"{h}self_attn."
    if shape.mla.q_lora_rank is None:
        q = [one_to_one(f"{a}linear_q_proj.weight", f"{s}q_proj.weight")]
    else:
        q = [
            one_to_one(f"{a}linear_q_down_proj.weight", f"{s}q_a_proj.weight"),
            one_to_one(f"{a}linear_q_up_proj.weight", f"{s}q_b_proj.weight"),
            one_to_one(f"{a}q_layernorm.weight", f"{s}q_a_layernorm.weight"),
        ]
    return [
        *q,
        one_to_one(f"{a}linear_kv_down_proj.weight", f"{s}kv_a_proj_with_mqa.weight"),
        one_to_one(f"{a}linear_kv_up_proj.weight", f"{s}kv_b_proj.weight"),
        one_to_one(f"{a}kv_layernorm.weight", f"{s}kv_a_layernorm.weight"),
        one_to_one(f"{a}linear_proj.weight", f"{s}o_proj.weight"),
    ]


def _moe_rules(shape: Shape, m: str, h: str) -> list[Rule]:
    out = [
        one_to_one(f"{m}mlp.router.weight", f"{h}mlp.gate.weight"),
        one_to_one(f"{m}mlp.router.expert_bias", f"{h}mlp.gate.e_score_correction_bias", buffer=True),
    ]
    for e in range(shape.moe.experts):
        out += swiglu_rules(f"{m}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}.")
    if shape.moe.shared_experts:
        out += swiglu_rules(f"{m}mlp.shared_experts.", f"{h}mlp.shared_experts.")
    return out


def rules(shape: Shape) -> list[Rule]:
    out = embedding_rules(shape, first=True)
    for i, is_moe in enumerate(_moe_layer_pattern(shape)):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        norms = layer_norm_rules(m, h)
        mlp = _moe_rules(shape, m, h) if is_moe else swiglu_rules(f"{m}mlp.", f"{h}mlp.")
        out += [norms[0], *_mla_rules(shape, m, h), norms[1], *mlp]
    return out + embedding_rules(shape, first=False)


def mla_flops(shape: Shape, seq_len: int) -> float:
    h, mla, n = shape.hidden, shape.mla, shape.heads
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    q = h * n * qk if mla.q_lora_rank is None else h * mla.q_lora_rank + mla.q_lora_rank * n * qk
    kv = h * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank * n * (mla.qk_nope_head_dim + mla.v_head_dim)
    out = n * mla.v_head_dim * h
    return 2.0 * (q + kv + out) + flops.attention_core(n, qk, mla.v_head_dim, seq_len)


def moe_flops(shape: Shape) -> float:
    """Router, the top-k routed experts a token uses, and the shared experts."""
    moe, h = shape.moe, shape.hidden
    return 2.0 * h * moe.experts + flops.swiglu(h, moe.ffn_hidden * moe.topk + moe.shared_hidden)


def flops_per_token(shape: Shape, seq_len: int) -> float:
    mlps = sum(moe_flops(shape) if is_moe else flops.swiglu(shape.hidden, shape.ffn_hidden)
               for is_moe in _moe_layer_pattern(shape))
    return shape.layers * mla_flops(shape, seq_len) + mlps + flops.output_head(shape.hidden, shape.vocab)


def untrained(shape: Shape, name: str) -> bool:
    """DeepSeek-V3's multi-token-prediction layer (``model.layers.61.*`` past the 61 trained layers: ``eh_proj``,
    ``enorm``, ``hnorm``, ``shared_head``, a whole decoder layer): not trained (``num_nextn_predict_layers: 0``)."""
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= shape.layers


BUNDLE = FamilyBundle(
    name="deepseek_v3",
    hf_model_type="deepseek_v3",
    blocks=("mla", "moe"),
    transformer_config=transformer_config,
    layer_specs=layer_specs,
    gpt_kwargs=gpt_kwargs,
    hf_config=hf_config,
    shape_from_hf=shape_from_hf,
    rules=rules,
    flops_per_token=flops_per_token,
    untrained=untrained,
)
