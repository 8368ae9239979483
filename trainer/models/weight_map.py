"""HF ↔ megatron-core parameter names and tensor transforms: the single entry point for parameter names.

Checkpoint conversion (``hf_to_mcore`` / ``mcore_to_hf``, ``trainer.convert``) and weight sync to rollout
engines (``MegatronBackend.hf_named_tensors``) both go through ``rules(shape)``, which asks the family
bundle (``trainer.models.families``) for its rules; each family module documents its name table. A ``Rule``
ties one megatron tensor to one or more HF tensors and carries the two transforms.

Tensors are whole (unsharded) and keyed by GLOBAL megatron names: global layer index, and experts as
``decoder.layers.{i}.mlp.experts.local_experts.{e}.*`` with the global expert index e (SequentialMLP's
names under EP=1). Parallel backends gather shards into full tensors before calling these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from matrix.schema import Model, Shape
from trainer.models.families import bundle_of


@dataclass(frozen=True)
class Rule:
    """One megatron tensor ↔ its HF tensor(s).

    ``buffer``: the megatron side is a buffer, not a parameter (the router's expert bias), so a mapping of
    parameters alone (weight sync) may lack it; it is then skipped, and an HF checkpoint without it loads.
    """

    mcore: str
    hf: tuple[str, ...]
    to_hf: Callable[[Tensor], tuple[Tensor, ...]]
    to_mcore: Callable[..., Tensor]
    buffer: bool = False


def same(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


def identity(t: Tensor) -> Tensor:
    return t


def one_to_one(mcore: str, hf: str, *, buffer: bool = False) -> Rule:
    """A tensor that only changes its name."""
    return Rule(mcore, (hf,), same, identity, buffer=buffer)


def _gate_up_split(fused: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def _gate_up_merge(gate: Tensor, up: Tensor) -> Tensor:
    return torch.cat([gate, up], dim=0)


def swiglu_rules(mcore_prefix: str, hf_prefix: str) -> list[Rule]:
    """A SwiGLU MLP: megatron's fused fc1 ``[gate; up]`` and fc2 ↔ HF gate/up/down projections."""
    return [
        Rule(
            f"{mcore_prefix}linear_fc1.weight",
            (f"{hf_prefix}gate_proj.weight", f"{hf_prefix}up_proj.weight"),
            _gate_up_split,
            _gate_up_merge,
        ),
        one_to_one(f"{mcore_prefix}linear_fc2.weight", f"{hf_prefix}down_proj.weight"),
    ]


def embedding_rules(shape: Shape, *, first: bool) -> list[Rule]:
    """Token embedding (first) or final norm and output head (last; no head when embeddings are tied)."""
    if first:
        return [one_to_one("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    out = [one_to_one("decoder.final_layernorm.weight", "model.norm.weight")]
    if not shape.tie_embeddings:
        out.append(one_to_one("output_layer.weight", "lm_head.weight"))
    return out


def rules(shape: Shape | Model) -> list[Rule]:
    """Every tensor of the model, in megatron's parameter order (the family bundle's rules)."""
    shape_ = shape.shape if isinstance(shape, Model) else shape
    return bundle_of(shape).rules(shape_)


def iter_hf(named_mcore: Mapping[str, Tensor], shape: Shape | Model) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) for every mapped megatron tensor, lazily (weight sync streams these)."""
    for rule in rules(shape):
        if rule.mcore not in named_mcore:
            if rule.buffer:
                continue
            raise KeyError(f"megatron parameter {rule.mcore!r} is missing from the state dict")
        yield from zip(rule.hf, rule.to_hf(named_mcore[rule.mcore]), strict=True)


def stream_hf(named_mcore: Iterable[tuple[str, Tensor]], shape: Shape | Model) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) for each megatron tensor of a stream, in the stream's order, as each arrives (``iter_hf``
    for tensors that come one at a time: weight sync from ``gather.stream_whole_tensors``). Tensors no rule
    maps are passed over, as ``iter_hf`` does; a parameter the stream never brought is a KeyError at its end."""
    rule_of = {rule.mcore: rule for rule in rules(shape)}
    for name, tensor in named_mcore:
        rule = rule_of.pop(name, None)
        if rule is not None:
            yield from zip(rule.hf, rule.to_hf(tensor), strict=True)
        del tensor
    missing = [name for name, rule in rule_of.items() if not rule.buffer]
    if missing:
        raise KeyError(f"megatron parameter {missing[0]!r} is missing from the stream ({len(missing)} in all)")


def mcore_to_hf(state_dict: Mapping[str, Tensor], shape: Shape | Model) -> dict[str, Tensor]:
    """Megatron state dict (``_extra_state`` entries ignored) → HF state dict, contiguous tensors."""
    return {name: t.contiguous() for name, t in iter_hf(state_dict, shape)}


def hf_to_mcore(tensors: Mapping[str, Tensor], shape: Shape | Model) -> dict[str, Tensor]:
    """HF state dict → megatron tensors. Unknown HF names are an error (a wrong family would pass
    silently otherwise); a tied ``lm_head.weight`` next to ``model.embed_tokens.weight`` is accepted."""
    table = rules(shape)
    shape_ = shape.shape if isinstance(shape, Model) else shape
    known = {name for rule in table for name in rule.hf}
    if shape_.tie_embeddings:
        known.add("lm_head.weight")
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise KeyError(
            f"HF tensors with no megatron counterpart: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    missing = [name for rule in table if not rule.buffer for name in rule.hf if name not in tensors]
    if missing:
        raise KeyError(
            f"HF tensors missing for this shape: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return {
        rule.mcore: rule.to_mcore(*(tensors[n] for n in rule.hf)).contiguous()
        for rule in table
        if all(n in tensors for n in rule.hf)
    }


def hf_names(shape: Shape | Model) -> list[str]:
    """All HF parameter names of a shape, in order (what an engine's ``load_weights`` receives)."""
    return [name for rule in rules(shape) if not rule.buffer for name in rule.hf]
