"""Dense GQA decoder (Qwen2 / Qwen3): config, layer spec, weight rules and FLOPs the two families share.

Parameters of layer ``i`` as built by ``layer_spec`` (norms never fused into linears, whatever the provider):

    embedding.word_embeddings.weight                   model.embed_tokens.weight
    decoder.layers.i.input_layernorm.weight            model.layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.weight  model.layers.i.self_attn.{q,k,v}_proj.weight
    decoder.layers.i.self_attention.linear_qkv.bias    model.layers.i.self_attn.{q,k,v}_proj.bias   (qwen2)
    decoder.layers.i.self_attention.q_layernorm.weight model.layers.i.self_attn.q_norm.weight       (qwen3)
    decoder.layers.i.self_attention.k_layernorm.weight model.layers.i.self_attn.k_norm.weight       (qwen3)
    decoder.layers.i.self_attention.linear_proj.weight model.layers.i.self_attn.o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight          model.layers.i.post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight             model.layers.i.mlp.{gate,up}_proj.weight
    decoder.layers.i.mlp.linear_fc2.weight             model.layers.i.mlp.down_proj.weight
    decoder.final_layernorm.weight                     model.norm.weight
    output_layer.weight                                lm_head.weight   (absent when embeddings are tied)

Fused QKV: megatron's ``linear_qkv`` output rows are grouped per query group g (ng groups, hpg = heads / ng
query heads each, head dim hd): ``[q_g (hpg·hd rows), k_g (hd), v_g (hd)]`` for g = 0..ng−1.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import Tensor

from matrix.schema import Layout, Model, Shape
from trainer.models import flops
from trainer.models.families.bundle import FamilyBundle, HFConfigReader, cpu_config_kwargs, head_dim
from trainer.models.weight_map import Rule, embedding_rules, one_to_one, swiglu_rules


def transformer_config(model: Model, layout: Layout | None = None) -> TransformerConfig:
    shape = model.shape
    return TransformerConfig(
        **cpu_config_kwargs(model, layout),
        kv_channels=head_dim(shape),
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
    )


def gqa_attention_spec(backend: BackendSpecProvider, *, qk_norm: bool) -> ModuleSpec:
    """GQA self-attention with fused QKV (rope applied by GPTModel); optional per-head QK RMSNorm."""
    qk = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk,
            k_layernorm=qk,
        ),
    )


def dense_mlp_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """The SwiGLU MLP behind the layer's own ``pre_mlp_layernorm``. Not megatron's ``get_mlp_module_spec_for_backend``:
    with a provider that fuses norms into linears (Transformer Engine's) it takes ``TELayerNormColumnParallelLinear``
    for fc1, which would normalise a second time beside ``pre_mlp_layernorm`` and add a weight no HF name maps."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()),
    )


def pre_norm_layer(backend: BackendSpecProvider, attention: ModuleSpec, mlp: ModuleSpec) -> ModuleSpec:
    """RMSNorm → attention → residual → RMSNorm → MLP → residual."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_spec(model: Model, config: TransformerConfig, backend: BackendSpecProvider) -> TransformerBlockSubmodules:
    """The stage's layers (one spec repeated) and the final norm, both from the provider: left to megatron,
    the final norm would come from its module-level ``LNImpl`` (a torch norm without sequence parallelism)."""
    layer = pre_norm_layer(
        backend,
        gqa_attention_spec(backend, qk_norm=model.shape.qk_norm),
        dense_mlp_spec(backend),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=backend.layer_norm(rms_norm=True))


def gpt_kwargs(model: Model) -> dict:
    return dict(position_embedding_type="rope", rotary_base=model.shape.rope_theta, rotary_percent=1.0)


def qkv_transforms(shape: Shape):
    """Split / merge of megatron's per-group interleaved QKV (weights [rows, hidden] and biases [rows])."""
    ng, hd = shape.query_groups, head_dim(shape)
    hpg = shape.heads // ng

    def split(fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rest = fused.shape[1:]
        grouped = fused.reshape(ng, hpg + 2, hd, *rest)
        q = grouped[:, :hpg].reshape(ng * hpg * hd, *rest)
        k = grouped[:, hpg].reshape(ng * hd, *rest)
        v = grouped[:, hpg + 1].reshape(ng * hd, *rest)
        return q, k, v

    def merge(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rest = q.shape[1:]
        grouped = torch.cat(
            [q.reshape(ng, hpg, hd, *rest), k.reshape(ng, 1, hd, *rest), v.reshape(ng, 1, hd, *rest)], dim=1
        )
        return grouped.reshape(ng * (hpg + 2) * hd, *rest)

    return split, merge


def gqa_attention_rules(shape: Shape, m: str, h: str) -> list[Rule]:
    """Rules of one GQA attention block; ``m`` / ``h`` are the layer's megatron / HF name prefixes."""
    split, merge = qkv_transforms(shape)
    attn = f"{h}self_attn."
    out = [one_to_one(f"{m}self_attention.linear_proj.weight", f"{attn}o_proj.weight")]
    for kind in ("weight", "bias") if shape.qkv_bias else ("weight",):
        qkv = tuple(f"{attn}{p}_proj.{kind}" for p in "qkv")
        out.append(Rule(f"{m}self_attention.linear_qkv.{kind}", qkv, split, merge))
    if shape.qk_norm:
        out.append(one_to_one(f"{m}self_attention.q_layernorm.weight", f"{attn}q_norm.weight"))
        out.append(one_to_one(f"{m}self_attention.k_layernorm.weight", f"{attn}k_norm.weight"))
    return out


def layer_norm_rules(m: str, h: str) -> list[Rule]:
    return [
        one_to_one(f"{m}input_layernorm.weight", f"{h}input_layernorm.weight"),
        one_to_one(f"{m}pre_mlp_layernorm.weight", f"{h}post_attention_layernorm.weight"),
    ]


def rules(shape: Shape) -> list[Rule]:
    """Every parameter of a dense GQA model, in megatron's parameter order."""
    out = embedding_rules(shape, first=True)
    for i in range(shape.layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        norms = layer_norm_rules(m, h)
        out += [norms[0], *gqa_attention_rules(shape, m, h), norms[1], *swiglu_rules(f"{m}mlp.", f"{h}mlp.")]
    return out + embedding_rules(shape, first=False)


def gqa_attention_flops(shape: Shape, seq_len: int) -> float:
    hd = head_dim(shape)
    projections = 2.0 * shape.hidden * hd * (2 * shape.heads + 2 * shape.query_groups)  # q, o; k, v
    return projections + flops.attention_core(shape.heads, hd, hd, seq_len)


def flops_per_token(shape: Shape, seq_len: int) -> float:
    layer = gqa_attention_flops(shape, seq_len) + flops.swiglu(shape.hidden, shape.ffn_hidden)
    return shape.layers * layer + flops.output_head(shape.hidden, shape.vocab)


def read_dense_shape(reader: HFConfigReader) -> dict:
    """Shape fields of a dense Qwen config.json (sliding window and rope scaling are not built)."""
    shape = reader.common_shape()
    reader.expect("use_sliding_window", [False], "sliding-window attention is not built")
    reader.get("sliding_window")
    reader.expect("rope_scaling", [None], "rope scaling is not built for dense families")
    return shape


def dense_bundle(name: str, *, hf_config, shape_from_hf) -> FamilyBundle:
    """A dense GQA family: everything but its transformers config (and reading it back) is shared."""
    return FamilyBundle(
        name=name,
        hf_model_type=name,
        blocks=(),
        transformer_config=transformer_config,
        layer_specs=layer_spec,
        gpt_kwargs=gpt_kwargs,
        hf_config=hf_config,
        shape_from_hf=shape_from_hf,
        rules=rules,
        flops_per_token=flops_per_token,
    )
