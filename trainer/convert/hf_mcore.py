"""HF safetensors ↔ megatron-core state (global names, unsharded), streaming shard by shard.

The family comes from config.json's ``model_type`` and the config is read by the family
(``FamilyBundle.shape_from_hf``): an unsupported field is an error naming it. Tensors keep their stored
dtype both ways, so ``mcore-to-hf --like`` gives bit-identical tensors in the original shard layout.
Peak memory is about one input shard plus tensors whose partners (q/k/v, gate/up) sit in a later shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from torch import Tensor
from tqdm import tqdm

from matrix.schema import Model
from trainer.convert import ConvertError
from trainer.convert.shards import atomic_directory, copy_side_files, save_shard, write_index
from trainer.models.config import model_from_hf_config
from trainer.models.families import bundle_of
from trainer.models.shapes import check_shapes, expected_hf_shapes
from trainer.models.weight_files import (
    FORMAT,
    HF_INDEX,
    MCORE_INDEX,
    MCORE_META,
    iter_shard,
    read_json,
    read_mcore_model,
    shards_in_order,
    weight_map,
)
from trainer.models.weight_map import Rule, rules


def check_names(present: set[str], table: list[Rule], model: Model, *, where: Path) -> None:
    """Every tensor the rules name is there, and every other one is of a part the family does not train."""
    untrained = bundle_of(model).untrained
    present = {name for name in present if not untrained(model.shape, name)}
    expected = {n for r in table for n in r.hf}
    optional = {n for r in table if r.buffer for n in r.hf} | ({"lm_head.weight"} if model.shape.tie_embeddings else set())
    unknown = sorted(present - expected - optional)
    if unknown:
        raise ConvertError(f"{where}: tensor {unknown[0]!r} has no megatron-core counterpart in family {model.family}")
    missing = sorted(expected - optional - present)
    if missing:
        raise ConvertError(f"{where}: tensor {missing[0]!r} is missing for this config")


def hf_to_mcore(hf_dir: Path, out_dir: Path) -> Path:
    """Convert an HF checkpoint directory into a megatron-core directory (layout single)."""
    config = read_json(hf_dir / "config.json")
    model = model_from_hf_config(config, where=hf_dir / "config.json")
    mapping = weight_map(hf_dir)
    table = rules(model)
    check_names(set(mapping), table, model, where=hf_dir)
    check_shapes(hf_dir, mapping, expected_hf_shapes(model))
    rule_of = {name: rule for rule in table for name in rule.hf}
    shards = shards_in_order(mapping)
    with atomic_directory(out_dir) as tmp:
        pending, out_map, total = {}, {}, 0
        for k, shard in enumerate(tqdm(shards, desc="hf-to-mcore", unit="shard")):
            ready = {}
            for name, tensor in iter_shard(hf_dir, shard):
                rule = rule_of.get(name)
                if rule is None:  # a tied lm_head.weight: the embedding is the head
                    continue
                pending[name] = tensor
                if all(n in pending for n in rule.hf):
                    ready[rule.mcore] = rule.to_mcore(*(pending.pop(n) for n in rule.hf))
            if ready:
                file = f"mcore-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                total += save_shard(tmp / file, ready)
                out_map.update(dict.fromkeys(ready, file))
        write_index(tmp / MCORE_INDEX, out_map, total)
        meta = {"format": FORMAT, "layout": "single", "model": model.model_dump(mode="json"), "hf_config": config}
        (tmp / MCORE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def mcore_to_hf(mcore_dir: Path, out_dir: Path, like: Path) -> Path:
    """Convert an unsharded megatron-core directory back to HF, with the tensor → shard layout and files of
    ``like`` (a sharded directory is read by its layout's ranks: ``trainer.convert.sharded``)."""
    model, meta = read_mcore_model(mcore_dir)
    if "degrees" in meta:
        raise ConvertError(f"{mcore_dir}: sharded for layout {meta.get('layout')}; its layout's ranks read it "
                           "(python -m trainer.convert mcore-to-hf)")
    like_map = like_weight_map(model, like)
    mcore_map = weight_map(mcore_dir, index=MCORE_INDEX, single=None)
    known = {rule.mcore for rule in rules(model)}
    strangers = sorted(set(mcore_map) - known)
    if strangers:
        raise ConvertError(f"{mcore_dir}: tensor {strangers[0]!r} does not belong to family {model.family}")

    def stored() -> Iterator[tuple[str, Tensor]]:
        for shard in tqdm(shards_in_order(mcore_map), desc="mcore-to-hf", unit="shard"):
            yield from iter_shard(mcore_dir, shard)

    with atomic_directory(out_dir) as tmp:
        write_hf_like(stored(), model, like, like_map, tmp, source=mcore_dir)
    return out_dir


def like_weight_map(model: Model, like: Path) -> dict[str, str]:
    """HF name → shard file of the checkpoint ``like``, checked to hold exactly ``model``'s tensors."""
    like_map = weight_map(like)
    check_names(set(like_map), rules(model), model, where=like)
    return like_map


def write_hf_like(named: Iterable[tuple[str, Tensor]], model: Model, like: Path, like_map: dict[str, str],
                  out: Path, *, source: Path) -> None:
    """Write whole megatron tensors (global names, in any order) into the directory ``out`` as HF shards with
    ``like``'s tensor → shard layout, index and side files; a shard is written once all its tensors arrived."""
    rule_of = {rule.mcore: rule for rule in rules(model)}
    wanted: dict[str, set[str]] = {}
    for name, shard in like_map.items():
        wanted.setdefault(shard, set()).add(name)
    copy_side_files(like, out)
    buffers: dict[str, dict] = {shard: {} for shard in wanted}
    total = 0
    for name, tensor in named:
        if name not in rule_of:
            raise ConvertError(f"{source}: tensor {name!r} does not belong to family {model.family}")
        produced = dict(zip(rule_of[name].hf, rule_of[name].to_hf(tensor), strict=True))
        if "model.embed_tokens.weight" in produced and "lm_head.weight" in like_map and model.shape.tie_embeddings:
            produced["lm_head.weight"] = produced["model.embed_tokens.weight"]
        for hf_name, t in produced.items():
            if hf_name in like_map:
                buffers[like_map[hf_name]][hf_name] = t
        for target in [s for s, b in buffers.items() if b and set(b) == wanted[s]]:
            total += save_shard(out / target, buffers.pop(target))
    unfinished = sorted(s for s in buffers)
    if unfinished:
        missing = sorted(wanted[unfinished[0]] - set(buffers[unfinished[0]]))
        raise ConvertError(f"{source}: no tensor for {missing[0]!r} (shard {unfinished[0]} of {like})")
    if (like / HF_INDEX).exists():
        write_index(out / HF_INDEX, like_map, total)
