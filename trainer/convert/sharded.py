"""HF ↔ megatron-core sharded for a matrix layout's TP/PP/EP/ETP, each direction run by the layout's ranks.

Writing and reading run the layout's smallest world with the project's launcher (CP 1, DP as small as
megatron's expert grid allows: CP and DP replicate weights; ``trainer.convert.layouts``); the directory format
and how a rank reads its own files are in ``trainer.models.sharded_weights``. Tensors keep their stored dtype both ways, so
``mcore-to-hf --like`` gives the HF checkpoint back bit for bit.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from torch import Tensor

# Only light imports at module level: spawned ranks import this module before rank_session quiets megatron.
from matrix.schema import Layout, Model
from trainer.convert import ConvertError
from trainer.convert.layouts import check_fits, conversion_world, matrix_layout
from trainer.convert.shards import atomic_directory, save_shard
from trainer.models.sharded_weights import (
    ONE_PROCESS,
    check_files,
    file_names,
    is_expert,
    layout_degrees,
    local_tensors,
    own_shard,
)
from trainer.models.weight_files import MCORE_META, read_json, read_mcore_model, weight_map
from trainer.parallel.launcher import LOCAL, Placement


def mcore_to_hf_either(mcore_dir: Path, out_dir: Path, like: Path, placement: Placement = LOCAL) -> Path:
    """A megatron-core directory back to HF, sharded (its layout's ranks, started as ``placement`` says) or
    unsharded (streamed)."""
    from trainer.convert.hf_mcore import mcore_to_hf

    _, meta = read_mcore_model(mcore_dir)
    if "degrees" in meta:
        return read_sharded(mcore_dir, out_dir, like, placement)
    return mcore_to_hf(mcore_dir, out_dir, like)


# ------------------------------------------------------------------ HF → sharded


def write_sharded(hf_dir: Path, out_dir: Path, layout_name: str, placement: Placement = LOCAL) -> Path:
    """Convert an HF checkpoint into megatron-core state sharded for a matrix layout's TP/PP/EP/ETP degrees
    (a layout whose degrees are all 1, such as ``single``, writes the unsharded form), by the layout's ranks
    started as ``placement`` says."""
    from trainer.convert.hf_mcore import check_names, hf_to_mcore
    from trainer.models.config import model_from_hf_config
    from trainer.models.shapes import check_shapes, expected_hf_shapes
    from trainer.models.weight_map import rules

    layout = matrix_layout(layout_name)
    if layout_degrees(layout) == ONE_PROCESS:
        return hf_to_mcore(hf_dir, out_dir)
    config = read_json(hf_dir / "config.json")
    model = model_from_hf_config(config, where=hf_dir / "config.json")
    mapping = weight_map(hf_dir)
    check_names(set(mapping), rules(model), model, where=hf_dir)
    check_shapes(hf_dir, mapping, expected_hf_shapes(model))
    layout, world = conversion_world(layout)
    check_fits(layout, layout_name, model, world, hf_dir)
    with atomic_directory(out_dir) as tmp:
        _launch(placement, _write_rank, world, hf_dir, mapping, tmp, layout, layout_name, model, config)
    return out_dir


def _launch(placement: Placement, fn, world: int, *args) -> None:
    from trainer.parallel.launcher import RankFailed

    try:
        placement.launch(fn, world, *args)
    except RankFailed as e:
        raise ConvertError(str(e)) from None


def _write_rank(hf_dir: Path, mapping: dict[str, str], out: Path, layout: Layout, layout_name: str, model: Model,
                config: dict) -> None:
    """One rank of ``write_sharded``: its dense and expert files, if it owns them (DP / expert-DP rank 0)."""
    from trainer.parallel.rank import rank_session

    # conversion moves host tensors between files: the CPU platform (rank_session's default) whatever the machine has
    with rank_session(layout) as me:  # first: it quiets megatron's import warnings
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from safetensors import safe_open
        from tqdm import tqdm

        from trainer.models.build import build_gpt_model
        from trainer.models.weight_files import FORMAT
        from trainer.models.weight_map import rules
        from trainer.parallel.gather import local_shard, mark_tp_groups, whole_name

        rank, world = me.rank, me.world
        gpt = build_gpt_model(model, seed=0, layout=layout, materialize=False)  # filled below, piece by piece
        mark_tp_groups(gpt)
        dense_file, expert_file = file_names()
        owned = {n: t for n, t in local_tensors(gpt, model).items()
                 if (ps.get_expert_data_parallel_rank() if is_expert(t) else ps.get_data_parallel_rank()) == 0}
        table = rules(model)
        known = {rule.mcore for rule in table}
        needs: dict[str, list[str]] = {}
        for name, t in owned.items():
            needs.setdefault(whole_name(name, t, gpt, known), []).append(name)
        files: dict[str, dict[str, Tensor]] = {}
        with contextlib.ExitStack() as stack:
            handles = {s: stack.enter_context(safe_open(hf_dir / s, "pt")) for s in sorted(set(mapping.values()))}
            wanted = [rule for rule in table if rule.mcore in needs]
            for rule in tqdm(wanted, desc=f"hf-to-mcore {layout_name}", unit="tensor", disable=rank != 0):
                whole = rule.to_mcore(*(handles[mapping[n]].get_tensor(n) for n in rule.hf))  # one whole tensor
                for name in needs[rule.mcore]:
                    t = owned[name]
                    try:
                        piece = local_shard(whole, rule.mcore, t)
                    except RuntimeError:  # the whole tensor does not split into this parameter's sections
                        piece = whole
                    if piece.shape != t.shape:
                        raise ConvertError(f"{hf_dir}: {' + '.join(rule.hf)} give {rule.mcore} shape "
                                           f"{tuple(whole.shape)}, which does not fit this rank's {name!r} "
                                           f"{tuple(t.shape)} of the model config.json describes")
                    files.setdefault(expert_file if is_expert(t) else dense_file, {})[name] = piece.clone()
        written = {file: len(tensors) for file, tensors in files.items()}
        for file, tensors in files.items():
            save_shard(out / file, tensors)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(written, gathered, dst=0)  # also the barrier: every file is in place after it
        if rank == 0:
            meta = {"format": FORMAT, "layout": layout_name, "degrees": layout_degrees(layout),
                    "model": model.model_dump(mode="json"), "hf_config": config,
                    "files": dict(sorted(kv for part in gathered for kv in part.items()))}
            (out / MCORE_META).write_text(json.dumps(meta, indent=2) + "\n")


# ------------------------------------------------------------------ sharded → HF


def read_sharded(mcore_dir: Path, out_dir: Path, like: Path, placement: Placement = LOCAL) -> Path:
    """A sharded megatron-core directory back to HF with ``like``'s shard layout: the layout's ranks load their
    shards, and rank 0 takes the whole tensors one at a time (``gather.stream_whole_tensors``: each owner holds
    its share, rank 0 its own and the HF shards not complete yet) and writes each HF shard once complete."""
    from trainer.convert.hf_mcore import like_weight_map

    model, meta = read_mcore_model(mcore_dir)
    like_map = like_weight_map(model, like)
    check_files(mcore_dir, meta)
    degrees = meta["degrees"]
    if not isinstance(degrees, dict) or set(degrees) != set(ONE_PROCESS):
        raise ConvertError(f"{mcore_dir / MCORE_META}: 'degrees' must hold exactly {', '.join(ONE_PROCESS)}")
    # sequence parallelism changes no weight shape; megatron-core wants it on for MoE with TP
    layout = Layout(tp=degrees["tp"], pp=degrees["pp"], ep=degrees["ep"], etp=degrees["etp"],
                    first_stage_layers=degrees["first_stage_layers"], last_stage_layers=degrees["last_stage_layers"],
                    sequence_parallel=degrees["tp"] > 1 and model.shape.moe is not None)
    layout, world = conversion_world(layout)
    with atomic_directory(out_dir) as tmp:
        _launch(placement, _read_rank, world, mcore_dir, tmp, like, like_map, layout, model)
    return out_dir


def _read_rank(mcore_dir: Path, out: Path, like: Path, like_map: dict[str, str], layout: Layout,
               model: Model) -> None:
    from trainer.parallel.rank import rank_session

    # conversion moves host tensors between files: the CPU platform (rank_session's default) whatever the machine has
    with rank_session(layout) as me:  # first: it quiets megatron's import warnings
        from trainer.convert.hf_mcore import write_hf_like
        from trainer.models.build import build_gpt_model
        from trainer.parallel.gather import stream_whole_tensors

        gpt = build_gpt_model(model, seed=0, layout=layout)
        local = local_tensors(gpt, model)
        for name, t in own_shard(gpt, mcore_dir).items():
            local[name].data = t  # its stored dtype, so the gathered tensors are the stored ones bit for bit
        # parameters and the mapped buffers, one whole tensor at a time on rank 0, which writes each HF shard once
        # its tensors are in; the other ranks send theirs as rank 0 asks
        whole = stream_whole_tensors(gpt, model.shape.vocab)
        if me.rank == 0:
            write_hf_like(whole, model, like, like_map, out, source=mcore_dir)
        for _ in whole:
            pass
