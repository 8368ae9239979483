"""Qwen3-Next: gated delta-net (linear attention) layers, a gated full-attention layer every
``full_attention_interval``, MoE with a sigmoid-gated shared expert in every layer, zero-centred RMSNorms.

megatron-core's own modules: ``GatedDeltaNet`` (``megatron/core/ssm/gated_delta_net.py``) for the linear layers,
``SelfAttention`` with ``attention_output_gate`` and partial rotary for the full ones, the MoE layer with
``moe_shared_expert_gate``; norms are zero-centred through ``layernorm_zero_centered_gamma``. Without
flash-linear-attention (CPU, a bare GPU machine) the delta rule is megatron's torch chunked form and the causal
conv torch's conv1d (``trainer.models.kernel_fallbacks``); where it imports, megatron calls its kernels instead
((GPU) not verified here).

Layer ``i`` (megatron ← → HF ``model.layers.i.``), experts ``e`` by global index:

    input_layernorm.weight                        input_layernorm.weight                       (1 + w)
    self_attention.in_proj.weight                 linear_attn.in_proj_qkvz.weight + in_proj_ba  (linear)
    self_attention.conv1d.weight                  linear_attn.conv1d.weight                     (linear)
    self_attention.A_log / dt_bias                linear_attn.A_log / dt_bias                   (linear)
    self_attention.out_norm.weight                linear_attn.norm.weight               (plain w, linear)
    self_attention.out_proj.weight                linear_attn.out_proj.weight                   (linear)
    self_attention.linear_qkv.weight              self_attn.{q,k,v}_proj.weight                 (full)
    self_attention.{q,k}_layernorm.weight         self_attn.{q,k}_norm.weight          (1 + w, full)
    self_attention.linear_proj.weight             self_attn.o_proj.weight                       (full)
    pre_mlp_layernorm.weight                      post_attention_layernorm.weight               (1 + w)
    mlp.router.weight                             mlp.gate.weight
    mlp.experts.local_experts.e.linear_fc1/2      mlp.experts.e.{gate,up}/down_proj.weight
    mlp.shared_experts.linear_fc1/2.weight        mlp.shared_expert.{gate,up}/down_proj.weight
    mlp.shared_experts.gate_weight                mlp.shared_expert_gate.weight

Fused layouts (every map is a permutation of rows, so conversion is bit-exact both ways):
- ``in_proj`` rows are [q | k | v | z | b | a] (all heads each); HF groups them per key head g:
  ``in_proj_qkvz`` [q_g, k_g, v_g, z_g] and ``in_proj_ba`` [b_g, a_g], g = 0..key_heads−1.
- gated ``linear_qkv`` rows per query group g: [q_g, gate_g, k_g, v_g]; HF ``q_proj`` rows per head h: [q_h, gate_h].
- The delta net's output norm keeps a plain weight (transformers initialises it to ones, not zero-centred), so
  its spec asks for a non-zero-centred norm instead of shifting the weight by one.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import Tensor
from transformers import Qwen3NextConfig

from matrix.schema import Layout, LinearAttention, Model, MoE, Shape
from trainer.models import flops
from trainer.models.families.bundle import (
    FamilyBundle,
    HFConfigReader,
    UnsupportedConfig,
    cpu_config_kwargs,
    head_dim,
    hf_common_kwargs,
    moe_config_kwargs,
)
from trainer.models.families.deepseek_v3 import RouterSettingWarning, router_warnings
from trainer.models.families.dense import gqa_attention_spec, layer_norm_rules, pre_norm_layer
from trainer.models.specs import TorchNorm
from trainer.models.weight_map import Rule, embedding_rules, one_to_one, swiglu_rules

__all__ = ["BUNDLE", "RouterSettingWarning"]


def is_full_attention(shape: Shape, layer: int) -> bool:
    """transformers' layer_types: every full_attention_interval-th layer (1-based) is full attention."""
    return (layer + 1) % shape.linear_attention.full_attention_interval == 0


# ---------------------------------------------------------------------------------------------- megatron


def transformer_config(model: Model, layout: Layout | None = None) -> TransformerConfig:
    shape = model.shape
    la, moe = shape.linear_attention, shape.moe
    for message in router_warnings(moe):
        warnings.warn(message, RouterSettingWarning, stacklevel=2)
    return TransformerConfig(
        **cpu_config_kwargs(model, layout),
        **moe_config_kwargs(moe),
        kv_channels=head_dim(shape),
        qk_layernorm=True,
        layernorm_zero_centered_gamma=True,
        attention_output_gate=True,
        experimental_attention_variant="gated_delta_net",
        linear_attention_freq=la.full_attention_interval,
        linear_conv_kernel_dim=la.conv_kernel,
        linear_key_head_dim=la.key_head_dim,
        linear_value_head_dim=la.value_head_dim,
        linear_num_key_heads=la.key_heads,
        linear_num_value_heads=la.value_heads,
        # softmax over the top-k logits = transformers' softmax over all experts, top-k, renormalised
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_shared_expert_gate=True,
    )


class ShardedGatedDeltaNet(GatedDeltaNet):
    """megatron's ``GatedDeltaNet``, its TP layout spelled out on the parameters for whole-tensor gathering.

    megatron marks conv1d / A_log / dt_bias ``tensor_model_parallel`` without a ``partition_dim``, and each
    rank's ``in_proj`` / ``conv1d`` rows are its slice of every section ([q_r, k_r, v_r, z_r, b_r, a_r]), not a
    contiguous block: ``partition_sections`` says so (``trainer.parallel.gather``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        qk, v, nv = self.qk_dim, self.v_dim, self.num_value_heads
        for p in (self.conv1d.weight, self.A_log, self.dt_bias):
            p.partition_dim = 0
        self.in_proj.weight.partition_sections = (qk, qk, v, v, nv, nv)
        self.conv1d.weight.partition_sections = (qk, qk, v)


def _gated_delta_net_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """megatron's ``get_gated_delta_net_module_spec`` with local modules: the input norm stays the layer's own
    (no fused norm+linear on CPU), and the output norm keeps a plain weight (see the module docstring)."""
    return ModuleSpec(
        module=ShardedGatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(
            in_proj=backend.column_parallel_linear(),
            out_norm=ModuleSpec(module=TorchNorm, params={"zero_centered_gamma": False}),
            out_proj=backend.row_parallel_linear(),
        ),
    )


def layer_specs(model: Model, config: TransformerConfig, backend: BackendSpecProvider) -> TransformerBlockSubmodules:
    """Linear-attention and gated full-attention layers, each with the MoE MLP; sliced to this stage's layers."""
    moe = get_moe_module_spec_for_backend(backend=backend, num_experts=config.num_moe_experts,
                                          moe_grouped_gemm=config.moe_grouped_gemm)
    linear = pre_norm_layer(backend, _gated_delta_net_spec(backend), moe)
    full = pre_norm_layer(backend, gqa_attention_spec(backend, qk_norm=True), moe)
    every = [full if is_full_attention(model.shape, i) else linear for i in range(model.shape.layers)]
    offset = get_transformer_layer_offset(config)
    return TransformerBlockSubmodules(
        layer_specs=every[offset : offset + get_num_layers_to_build(config)],
        layer_norm=backend.layer_norm(rms_norm=True),
    )


def gpt_kwargs(model: Model) -> dict:
    return dict(position_embedding_type="rope", rotary_base=model.shape.rope_theta,
                rotary_percent=model.shape.partial_rotary_factor)


# ---------------------------------------------------------------------------------------------- transformers


def hf_config(model: Model) -> Qwen3NextConfig:
    shape = model.shape
    la, moe = shape.linear_attention, shape.moe
    common = hf_common_kwargs(model)
    # every layer is MoE; the dense-MLP width only matters for mlp_only_layers, which are not built
    return Qwen3NextConfig(
        **common,
        head_dim=head_dim(shape),
        partial_rotary_factor=shape.partial_rotary_factor,
        attention_bias=False,
        linear_conv_kernel_dim=la.conv_kernel,
        linear_key_head_dim=la.key_head_dim,
        linear_value_head_dim=la.value_head_dim,
        linear_num_key_heads=la.key_heads,
        linear_num_value_heads=la.value_heads,
        full_attention_interval=la.full_attention_interval,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=moe.ffn_hidden,
        shared_expert_intermediate_size=moe.shared_hidden,
        num_experts_per_tok=moe.topk,
        num_experts=moe.experts,
        norm_topk_prob=True,
    )


def shape_from_hf(config: Mapping) -> Shape:
    reader = HFConfigReader(config)
    fields = reader.common_shape()
    reader.expect("attention_bias", [False], "the projections have no bias")
    reader.expect("rope_scaling", [None], "rope scaling is not built for qwen3_next")
    reader.expect("use_sliding_window", [False], "sliding-window attention is not built")
    reader.get("sliding_window")
    reader.expect("norm_topk_prob", [True], "megatron's softmax-after-top-k router renormalises the top-k")
    reader.expect("decoder_sparse_step", [1], "every layer is MoE")
    reader.expect("mlp_only_layers", [[]], "every layer is MoE")
    for pretraining_only in ("router_aux_loss_coef", "output_router_logits"):
        reader.get(pretraining_only)  # pretraining settings; the recipe's router settings rule
    interval = reader.get("full_attention_interval", 4)
    layers = fields["layers"]
    types = reader.get("layer_types")
    pattern = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if types is not None and list(types) != pattern:
        raise UnsupportedConfig("layer_types", f"only every full_attention_interval={interval}-th layer full")
    experts_ffn = reader.require("moe_intermediate_size")
    shared_ffn = reader.get("shared_expert_intermediate_size") or 0
    # one gated shared expert of any size (megatron's moe_shared_expert_intermediate_size takes any positive one)
    shared_experts, odd = divmod(shared_ffn, experts_ffn)
    shape = Shape(
        **fields,
        head_dim=reader.get("head_dim") or fields["hidden"] // fields["heads"],
        partial_rotary_factor=float(reader.get("partial_rotary_factor", 1.0)),
        qk_norm=True,
        moe=MoE(
            experts=reader.require("num_experts"),
            topk=reader.require("num_experts_per_tok"),
            ffn_hidden=experts_ffn,
            shared_experts=1 if odd else shared_experts,
            shared_ffn_hidden=shared_ffn if odd else None,
        ),
        linear_attention=LinearAttention(
            key_heads=reader.require("linear_num_key_heads"),
            value_heads=reader.require("linear_num_value_heads"),
            key_head_dim=reader.require("linear_key_head_dim"),
            value_head_dim=reader.require("linear_value_head_dim"),
            conv_kernel=reader.get("linear_conv_kernel_dim", 4),
            full_attention_interval=interval,
        ),
    )
    reader.leftover()
    return shape


# ---------------------------------------------------------------------------------------------- weights


def _in_proj_transforms(la: LinearAttention):
    """megatron ``in_proj`` [q | k | v | z | b | a] ↔ HF ``in_proj_qkvz`` / ``in_proj_ba`` grouped per key head."""
    nk, dk, dv = la.key_heads, la.key_head_dim, la.value_head_dim
    r = la.value_heads // nk  # value heads per key head
    qkvz_sizes, ba_sizes = [dk, dk, r * dv, r * dv], [r, r]

    def to_hf(w: Tensor) -> tuple[Tensor, Tensor]:
        hidden = w.shape[1]
        q, k, v, z, b, a = w.split([nk * dk, nk * dk, nk * r * dv, nk * r * dv, nk * r, nk * r])
        per_head = [t.reshape(nk, -1, hidden) for t in (q, k, v, z, b, a)]
        qkvz = torch.cat(per_head[:4], dim=1).reshape(-1, hidden)
        ba = torch.cat(per_head[4:], dim=1).reshape(-1, hidden)
        return qkvz, ba

    def to_mcore(qkvz: Tensor, ba: Tensor) -> Tensor:
        hidden = qkvz.shape[1]
        q, k, v, z = qkvz.reshape(nk, -1, hidden).split(qkvz_sizes, dim=1)
        b, a = ba.reshape(nk, -1, hidden).split(ba_sizes, dim=1)
        return torch.cat([t.reshape(-1, hidden) for t in (q, k, v, z, b, a)])

    return to_hf, to_mcore


def _gated_qkv_transforms(shape: Shape):
    """megatron's gated ``linear_qkv`` (per group [q_g, gate_g, k_g, v_g]) ↔ HF q_proj (per head [q_h, gate_h]), k, v."""
    ng, hd = shape.query_groups, head_dim(shape)
    hpg = shape.heads // ng

    def to_hf(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = w.shape[1]
        q, gate, k, v = w.reshape(ng, -1, hidden).split([hpg * hd, hpg * hd, hd, hd], dim=1)
        q_proj = torch.stack([q.reshape(ng, hpg, hd, hidden), gate.reshape(ng, hpg, hd, hidden)], dim=2)
        return q_proj.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)

    def to_mcore(q_proj: Tensor, k: Tensor, v: Tensor) -> Tensor:
        hidden = q_proj.shape[1]
        heads = q_proj.reshape(ng, hpg, 2, hd, hidden)
        q, gate = heads[:, :, 0].reshape(ng, -1, hidden), heads[:, :, 1].reshape(ng, -1, hidden)
        return torch.cat([q, gate, k.reshape(ng, hd, hidden), v.reshape(ng, hd, hidden)], dim=1).reshape(-1, hidden)

    return to_hf, to_mcore


def _linear_attention_rules(shape: Shape, m: str, h: str) -> list[Rule]:
    a, s = f"{m}self_attention.", f"{h}linear_attn."
    to_hf, to_mcore = _in_proj_transforms(shape.linear_attention)
    return [
        Rule(f"{a}in_proj.weight", (f"{s}in_proj_qkvz.weight", f"{s}in_proj_ba.weight"), to_hf, to_mcore),
        one_to_one(f"{a}conv1d.weight", f"{s}conv1d.weight"),
        one_to_one(f"{a}A_log", f"{s}A_log"),
        one_to_one(f"{a}dt_bias", f"{s}dt_bias"),
        one_to_one(f"{a}out_norm.weight", f"{s}norm.weight"),
        one_to_one(f"{a}out_proj.weight", f"{s}out_proj.weight"),
    ]


def _full_attention_rules(shape: Shape, m: str, h: str) -> list[Rule]:
    a, s = f"{m}self_attention.", f"{h}self_attn."
    to_hf, to_mcore = _gated_qkv_transforms(shape)
    return [
        Rule(f"{a}linear_qkv.weight", tuple(f"{s}{p}_proj.weight" for p in "qkv"), to_hf, to_mcore),
        one_to_one(f"{a}q_layernorm.weight", f"{s}q_norm.weight"),
        one_to_one(f"{a}k_layernorm.weight", f"{s}k_norm.weight"),
        one_to_one(f"{a}linear_proj.weight", f"{s}o_proj.weight"),
    ]


def _moe_rules(shape: Shape, m: str, h: str) -> list[Rule]:
    out = [one_to_one(f"{m}mlp.router.weight", f"{h}mlp.gate.weight")]
    for e in range(shape.moe.experts):
        out += swiglu_rules(f"{m}mlp.experts.local_experts.{e}.", f"{h}mlp.experts.{e}.")
    if shape.moe.shared_experts:
        out += swiglu_rules(f"{m}mlp.shared_experts.", f"{h}mlp.shared_expert.")
        out.append(one_to_one(f"{m}mlp.shared_experts.gate_weight", f"{h}mlp.shared_expert_gate.weight"))
    return out


def rules(shape: Shape) -> list[Rule]:
    out = embedding_rules(shape, first=True)
    for i in range(shape.layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        norms = layer_norm_rules(m, h)
        mixer = _full_attention_rules if is_full_attention(shape, i) else _linear_attention_rules
        out += [norms[0], *mixer(shape, m, h), norms[1], *_moe_rules(shape, m, h)]
    return out + embedding_rules(shape, first=False)


# ---------------------------------------------------------------------------------------------- FLOPs


def gated_delta_net_flops(shape: Shape) -> float:
    """Projections, the depthwise causal conv, and the recurrent delta rule: per value head and token,
    S·k, the rank-1 update β(v − S·k)·kᵀ and the readout Sᵀ·q (3 · dk · dv multiply-adds). The chunked form
    computes the same recurrence; its cost does not grow with context."""
    la, h = shape.linear_attention, shape.hidden
    qk, v = la.key_heads * la.key_head_dim, la.value_heads * la.value_head_dim
    projections = h * (2 * qk + 2 * v) + h * 2 * la.value_heads + v * h  # in_proj_qkvz, in_proj_ba, out_proj
    conv = la.conv_kernel * (2 * qk + v)
    recurrence = 3 * la.value_heads * la.key_head_dim * la.value_head_dim
    return 2.0 * (projections + conv + recurrence)


def gated_attention_flops(shape: Shape, seq_len: int) -> float:
    """GQA whose q projection also yields a per-head output gate (2× q rows)."""
    hd = head_dim(shape)
    projections = shape.hidden * hd * (2 * shape.heads + 2 * shape.query_groups + shape.heads)  # q+gate, k, v, o
    return 2.0 * projections + flops.attention_core(shape.heads, hd, hd, seq_len)


def moe_flops(shape: Shape) -> float:
    """Router, the top-k routed experts, the shared expert(s) and their scalar gate."""
    moe, h = shape.moe, shape.hidden
    routed_and_shared = flops.swiglu(h, moe.ffn_hidden * moe.topk + moe.shared_hidden)
    return 2.0 * h * moe.experts + routed_and_shared + (2.0 * h if moe.shared_experts else 0.0)


def flops_per_token(shape: Shape, seq_len: int) -> float:
    mixers = sum(
        gated_attention_flops(shape, seq_len) if is_full_attention(shape, i) else gated_delta_net_flops(shape)
        for i in range(shape.layers)
    )
    return mixers + shape.layers * moe_flops(shape) + flops.output_head(shape.hidden, shape.vocab)


def untrained(shape: Shape, name: str) -> bool:
    """Qwen3-Next's multi-token-prediction module (``mtp.*``, which transformers ignores too): not trained."""
    return name.startswith("mtp.")


# transformers' Qwen3-Next module binds these when a GPU is present and flash-linear-attention / causal-conv1d
# import; each gated-delta-net layer takes them at construction (its norm made on the current GPU), else its torch
# paths. None while a host model is built: its layers take the torch paths.
_GPU_KERNELS = ("causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule",
                "fused_recurrent_gated_delta_rule", "FusedRMSNormGated")


@contextlib.contextmanager
def hf_on_host() -> Iterator[None]:
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling

    bound = {name: getattr(modeling, name) for name in _GPU_KERNELS}
    try:
        for name in _GPU_KERNELS:
            setattr(modeling, name, None)
        yield
    finally:
        for name, value in bound.items():
            setattr(modeling, name, value)


BUNDLE = FamilyBundle(
    name="qwen3_next",
    hf_model_type="qwen3_next",
    blocks=("moe", "linear_attention"),
    transformer_config=transformer_config,
    layer_specs=layer_specs,
    gpt_kwargs=gpt_kwargs,
    hf_config=hf_config,
    shape_from_hf=shape_from_hf,
    rules=rules,
    flops_per_token=flops_per_token,
    untrained=untrained,
    hf_on_host=hf_on_host,
)
