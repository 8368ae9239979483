"""Qwen3-MoE: Qwen3's attention (GQA, QK-norm, no biases) with a softmax top-k MoE in every layer (no shared
expert, ``norm_topk_prob`` renormalising the chosen experts' weights).

Built on the FSDP2 trainer only, which trains transformers' own ``Qwen3MoeForCausalLM``: this bundle writes
that class's config and reads it back. The megatron-core builders refuse with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import Qwen3MoeConfig

from matrix.schema import Model, MoE, Shape
from trainer.models import flops
from trainer.models.families import dense
from trainer.models.families.bundle import FamilyBundle, HFConfigReader, head_dim, hf_common_kwargs


def _megatron_not_built(*_args, **_kwargs):
    raise NotImplementedError("model family 'qwen3_moe' is built on the fsdp trainer only (trainer: fsdp); the "
                              "megatron backend does not build it yet")


def hf_config(model: Model) -> Qwen3MoeConfig:
    shape, moe = model.shape, model.shape.moe
    if not shape.qk_norm or shape.qkv_bias:
        raise ValueError("transformers' Qwen3-MoE has QK-norm and no q/k/v biases: set qk_norm: true, qkv_bias: false")
    return Qwen3MoeConfig(
        **hf_common_kwargs(model), head_dim=head_dim(shape), attention_bias=False, use_sliding_window=False,
        num_experts=moe.experts, num_experts_per_tok=moe.topk, moe_intermediate_size=moe.ffn_hidden,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=moe.aux_loss_coeff,
        output_router_logits=False,
    )


def shape_from_hf(config: Mapping) -> Shape:
    reader = HFConfigReader(config)
    reader.expect("attention_bias", [False], "o_proj bias is not built")
    reader.expect("norm_topk_prob", [True], "the chosen experts' weights are renormalised")
    reader.expect("decoder_sparse_step", [1], "every layer is MoE")
    reader.expect("mlp_only_layers", [[]], "every layer is MoE")
    reader.expect("output_router_logits", [False], "no load-balancing loss in RL")
    fields = dense.read_dense_shape(reader)
    moe = MoE(experts=reader.require("num_experts"), topk=reader.require("num_experts_per_tok"),
              ffn_hidden=reader.require("moe_intermediate_size"),
              aux_loss_coeff=float(reader.get("router_aux_loss_coef", 0.0)))
    shape = Shape(**fields, head_dim=reader.get("head_dim") or fields["hidden"] // fields["heads"], qk_norm=True,
                  moe=moe)
    reader.leftover()
    return shape


def flops_per_token(shape: Shape, seq_len: int) -> float:
    """GQA attention, the router and the top-k experts (active experts only)."""
    moe = shape.moe
    layer = (dense.gqa_attention_flops(shape, seq_len) + 2.0 * shape.hidden * moe.experts
             + moe.topk * flops.swiglu(shape.hidden, moe.ffn_hidden))
    return shape.layers * layer + flops.output_head(shape.hidden, shape.vocab)


BUNDLE = FamilyBundle(
    name="qwen3_moe",
    hf_model_type="qwen3_moe",
    blocks=("moe",),
    transformer_config=_megatron_not_built,
    layer_specs=_megatron_not_built,
    gpt_kwargs=_megatron_not_built,
    hf_config=hf_config,
    shape_from_hf=shape_from_hf,
    rules=_megatron_not_built,
    flops_per_token=flops_per_token,
)
