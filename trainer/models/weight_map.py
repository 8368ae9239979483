"""HF ↔ megatron-core parameter names and tensor transforms: the single source of parameter names.

Checkpoint conversion (``hf_to_mcore`` / ``mcore_to_hf``) and weight sync to rollout engines
(``MegatronBackend.hf_named_tensors``) both go through ``rules(shape)``, so a name exists in one place.
Each ``Rule`` ties one megatron parameter to one or more HF parameters and carries the two transforms.

Dense GQA family (Qwen2 / Qwen3), layer ``i``, as built by ``specs.dense_layer_spec`` (norms not fused):

    embedding.word_embeddings.weight                  model.embed_tokens.weight
    decoder.layers.i.input_layernorm.weight           model.layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.weight model.layers.i.self_attn.{q,k,v}_proj.weight
    decoder.layers.i.self_attention.linear_qkv.bias   model.layers.i.self_attn.{q,k,v}_proj.bias   (qwen2)
    decoder.layers.i.self_attention.q_layernorm.weight model.layers.i.self_attn.q_norm.weight      (qwen3)
    decoder.layers.i.self_attention.k_layernorm.weight model.layers.i.self_attn.k_norm.weight      (qwen3)
    decoder.layers.i.self_attention.linear_proj.weight model.layers.i.self_attn.o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight         model.layers.i.post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight            model.layers.i.mlp.{gate,up}_proj.weight
    decoder.layers.i.mlp.linear_fc2.weight            model.layers.i.mlp.down_proj.weight
    decoder.final_layernorm.weight                    model.norm.weight
    output_layer.weight                               lm_head.weight   (absent when embeddings are tied)

Fused QKV: megatron's ``linear_qkv`` output rows are grouped per query group g (ng groups, hpg = heads / ng
query heads each, head dim hd): ``[q_g (hpg·hd rows), k_g (hd), v_g (hd)]`` for g = 0..ng−1. Fused fc1:
``[gate (ffn rows); up (ffn rows)]``. Tensors are whole (unsharded); TP shards are gathered before this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from matrix.schema import Shape
from trainer.models.config import head_dim


@dataclass(frozen=True)
class Rule:
    """One megatron parameter ↔ its HF parameter(s)."""

    mcore: str
    hf: tuple[str, ...]
    to_hf: Callable[[Tensor], tuple[Tensor, ...]]
    to_mcore: Callable[..., Tensor]


def _same(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


def _identity(t: Tensor) -> Tensor:
    return t


def _qkv_transforms(shape: Shape):
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


def _gate_up_split(fused: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def _gate_up_merge(gate: Tensor, up: Tensor) -> Tensor:
    return torch.cat([gate, up], dim=0)


def _check_dense(shape: Shape) -> None:
    if shape.mla is not None or shape.moe is not None or shape.linear_attention is not None:
        raise NotImplementedError(
            "weight maps exist for the dense GQA family (qwen2 / qwen3) only; MLA, MoE and linear-attention "
            "shapes are not mapped yet"
        )


def rules(shape: Shape) -> list[Rule]:
    """Every parameter of a dense GQA model, in megatron's parameter order."""
    _check_dense(shape)
    qkv_split, qkv_merge = _qkv_transforms(shape)
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _same, _identity)]
    for i in range(shape.layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = f"{h}self_attn."
        out.append(Rule(f"{m}input_layernorm.weight", (f"{h}input_layernorm.weight",), _same, _identity))
        out.append(Rule(f"{m}self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), _same, _identity))
        for kind in ("weight", "bias") if shape.qkv_bias else ("weight",):
            out.append(
                Rule(
                    f"{m}self_attention.linear_qkv.{kind}",
                    tuple(f"{attn}{p}_proj.{kind}" for p in "qkv"),
                    qkv_split,
                    qkv_merge,
                )
            )
        if shape.qk_norm:
            out.append(
                Rule(f"{m}self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",), _same, _identity)
            )
            out.append(
                Rule(f"{m}self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",), _same, _identity)
            )
        out.append(
            Rule(f"{m}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",), _same, _identity)
        )
        out.append(
            Rule(
                f"{m}mlp.linear_fc1.weight",
                (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
                _gate_up_split,
                _gate_up_merge,
            )
        )
        out.append(Rule(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), _same, _identity))
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), _same, _identity))
    if not shape.tie_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), _same, _identity))
    return out


def iter_hf(named_mcore: Mapping[str, Tensor], shape: Shape) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) for every mapped megatron tensor, lazily (weight sync streams these)."""
    for rule in rules(shape):
        if rule.mcore not in named_mcore:
            raise KeyError(f"megatron parameter {rule.mcore!r} is missing from the state dict")
        yield from zip(rule.hf, rule.to_hf(named_mcore[rule.mcore]), strict=True)


def mcore_to_hf(state_dict: Mapping[str, Tensor], shape: Shape) -> dict[str, Tensor]:
    """Megatron state dict (``_extra_state`` entries ignored) → HF state dict, contiguous tensors."""
    return {name: t.contiguous() for name, t in iter_hf(state_dict, shape)}


def hf_to_mcore(tensors: Mapping[str, Tensor], shape: Shape) -> dict[str, Tensor]:
    """HF state dict → megatron parameters. Unknown HF names are an error (a wrong family would pass
    silently otherwise); a tied ``lm_head.weight`` next to ``model.embed_tokens.weight`` is accepted."""
    table = rules(shape)
    known = {name for rule in table for name in rule.hf}
    if shape.tie_embeddings:
        known.add("lm_head.weight")
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise KeyError(
            f"HF tensors with no megatron counterpart: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    missing = [name for rule in table for name in rule.hf if name not in tensors]
    if missing:
        raise KeyError(
            f"HF tensors missing for this shape: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return {rule.mcore: rule.to_mcore(*(tensors[n] for n in rule.hf)).contiguous() for rule in table}


def hf_names(shape: Shape) -> list[str]:
    """All HF parameter names of a shape, in order (what an engine's ``load_weights`` receives)."""
    return [name for rule in rules(shape) for name in rule.hf]
