"""Sharded megatron-core directories: one safetensors file per distinct TP/PP/EP/ETP shard of a matrix layout.

The format (``mcore.json`` with the layout's degrees, ``dense-tp{T}-pp{P}`` and ``experts-pp{P}-ep{E}-etp{X}``
files keyed by each rank's LOCAL parameter names) is what ``own_shard`` reads back in a rank of a run with the
same degrees. Writing and reading run the layout's smallest world with the project's launcher (CP 1, DP as
small as megatron's expert grid allows: CP and DP replicate weights); what a shard is comes from megatron's
own parameter attributes (``trainer.parallel.gather``). Tensors keep their stored dtype both ways, so
``mcore-to-hf --like`` gives the HF checkpoint back bit for bit. Besides parameters, a file holds the
persistent buffers the family maps to HF tensors (the router's expert bias).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

# Only light imports at module level: spawned ranks import this module before rank_session quiets megatron.
from matrix.schema import Layout, Model
from trainer.convert import ConvertError
from trainer.convert.shards import (
    MCORE_INDEX,
    MCORE_META,
    atomic_directory,
    read_json,
    save_shard,
    weight_map,
)

ONE_PROCESS = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "first_stage_layers": None, "last_stage_layers": None}


# ------------------------------------------------------------------ layouts and degrees


def matrix_layout(name: str) -> Layout:
    """A matrix layout that megatron-core state can be sharded for (unknown and FSDP layouts refused)."""
    from matrix import load_matrix

    layouts = load_matrix().layouts
    if name not in layouts:
        raise ConvertError(f"--layout {name!r} is not a matrix layout ({', '.join(layouts)})")
    if layouts[name].fsdp:
        raise ConvertError(f"--layout {name} is an FSDP layout: FSDP runs load the HF checkpoint itself; "
                           f"convert nothing (or use --layout single for a megatron-core run)")
    return layouts[name]


def layout_degrees(layout: Layout) -> dict:
    first, last = (layout.first_stage_layers, layout.last_stage_layers) if layout.pp > 1 else (None, None)
    return {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.expert_tp,
            "first_stage_layers": first, "last_stage_layers": last}


def _process_degrees(model: torch.nn.Module) -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "etp": ps.get_expert_tensor_parallel_world_size(),
            "first_stage_layers": model.config.num_layers_in_first_pipeline_stage,
            "last_stage_layers": model.config.num_layers_in_last_pipeline_stage}


def describe_degrees(degrees: object) -> str:
    """``tp=2 pp=1 ...`` (as mcore.json or a process has them; a malformed value is shown as it is)."""
    if not isinstance(degrees, dict):
        return f"degrees {degrees!r}"
    return " ".join(f"{k}={v}" for k, v in degrees.items() if v is not None)


def check_files(mcore_dir: Path, meta: dict) -> None:
    """Every shard file ``mcore.json`` lists is there (each rank checks its own files' contents)."""
    missing = sorted(f for f in meta.get("files", {}) if not (mcore_dir / f).is_file())
    if missing:
        raise ConvertError(f"{mcore_dir}: shard {missing[0]} listed in {MCORE_META} is missing")


def _layout_named(degrees: dict) -> str:
    """A matrix layout with these degrees (what to convert with), or the degrees themselves."""
    from matrix import load_matrix

    if degrees == ONE_PROCESS:
        return "single"
    names = [n for n, lay in load_matrix().layouts.items() if not lay.fsdp and layout_degrees(lay) == degrees]
    return names[0] if names else f"<a matrix layout with {describe_degrees(degrees)}>"


def conversion_world(layout: Layout) -> tuple[Layout, int]:
    """The layout as a conversion runs it (CP 1) and its world: the fewest ranks megatron's dense and expert
    grids both fit, lcm(TP·PP, ETP·EP·PP)."""
    from trainer.parallel.layout import ParallelLayout

    layout = layout.model_copy(update={"cp": 1, "dp": None})
    return layout, ParallelLayout.of(layout, 1).min_world


def _check_fits(layout: Layout, name: str, model: Model, world: int, where: Path) -> None:
    """The trainer's own checks of a layout against a model (heads % TP, experts % EP, layers over stages)."""
    from trainer.parallel.layout import ParallelLayout

    for key, message in ParallelLayout.of(layout, world).model_problems(model.shape, str(where)):
        raise ConvertError(f"--layout {name}: {key}: {message}")


# ------------------------------------------------------------------ a rank's tensors and files


def _local_tensors(gpt: torch.nn.Module, model: Model) -> dict[str, Tensor]:
    """Local name → parameter, and the persistent buffers the family maps to HF tensors, of this rank's model."""
    from trainer.models.weight_map import rules
    from trainer.parallel.gather import global_name

    mapped_buffers = {rule.mcore for rule in rules(model) if rule.buffer}
    named = dict(gpt.named_parameters())
    named |= {n: b for n, b in gpt.named_buffers() if global_name(n, gpt) in mapped_buffers}
    return named


def _is_expert(t: Tensor) -> bool:
    return not getattr(t, "allreduce", True)


def _file_names() -> tuple[str, str]:
    """(dense file, expert file) of this rank."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_rank()
    return (f"dense-tp{ps.get_tensor_model_parallel_rank():02d}-pp{pp:03d}.safetensors",
            f"experts-pp{pp:03d}-ep{ps.get_expert_model_parallel_rank():03d}"
            f"-etp{ps.get_expert_tensor_parallel_rank():02d}.safetensors")


def own_shard(model: torch.nn.Module, mcore_dir: Path) -> dict[str, Tensor]:
    """This rank's tensors of a megatron-core directory, keyed by local parameter (and mapped buffer) name:
    the union of its dense and expert files, in their stored dtype, checked against the model's names and shapes.

    Needs megatron's ``parallel_state`` set up with the degrees the directory was written for (the unsharded
    form counts as every degree 1); other degrees are refused in one line naming both and the fix.
    """
    from trainer.convert.hf_mcore import read_mcore_model

    described, model_meta = read_mcore_model(Path(mcore_dir))
    written = model_meta.get("degrees", ONE_PROCESS)
    running = _process_degrees(model)
    if written != running:
        raise ConvertError(
            f"{mcore_dir}: written for layout {model_meta.get('layout')} ({describe_degrees(written)}), this process runs "
            f"{describe_degrees(running)}; convert again with --layout {_layout_named(running)} or use the unsharded form")
    expected = _local_tensors(model, described)
    if "degrees" not in model_meta:  # one process: local names are the global names
        from safetensors.torch import load_file

        tensors = {}
        for shard in sorted(set(weight_map(Path(mcore_dir), index=MCORE_INDEX, single=None).values())):
            tensors |= load_file(Path(mcore_dir) / shard)
    else:
        dense, experts = _file_names()
        has_experts = any(_is_expert(t) for t in expected.values())
        tensors = _read_file(Path(mcore_dir) / dense) | (_read_file(Path(mcore_dir) / experts) if has_experts else {})
    for name, t in expected.items():
        if name not in tensors:
            raise ConvertError(f"{mcore_dir}: no tensor for {name!r} of this rank ({_file_names()[0]})")
        if tensors[name].shape != t.shape:
            raise ConvertError(f"{mcore_dir}: tensor {name!r} has shape {tuple(tensors[name].shape)}, this rank's "
                               f"model has {tuple(t.shape)}")
    strangers = sorted(set(tensors) - set(expected))
    if strangers:
        raise ConvertError(f"{mcore_dir}: tensor {strangers[0]!r} is not a parameter of this rank's model")
    return tensors


def _read_file(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConvertError(f"{path}: not found (the directory is incomplete)")
    return load_file(path)


# ------------------------------------------------------------------ HF → sharded


def write_sharded(hf_dir: Path, out_dir: Path, layout_name: str) -> Path:
    """Convert an HF checkpoint into megatron-core state sharded for a matrix layout's TP/PP/EP/ETP degrees
    (a layout whose degrees are all 1, such as ``single``, writes the unsharded form)."""
    from trainer.convert.hf_mcore import check_names, hf_to_mcore, model_from_hf_config
    from trainer.convert.shapes import check_shapes, expected_hf_shapes
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
    _check_fits(layout, layout_name, model, world, hf_dir)
    with atomic_directory(out_dir) as tmp:
        _launch(_write_rank, world, hf_dir, mapping, tmp, layout, layout_name, model, config)
    return out_dir


def _launch(fn, world: int, *args) -> None:
    from trainer.parallel.launcher import RankFailed, launch

    try:
        launch(fn, world, *args)
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

        from trainer.convert.hf_mcore import FORMAT
        from trainer.models.build import build_gpt_model
        from trainer.models.weight_map import rules
        from trainer.parallel.gather import local_shard, mark_tp_groups, whole_name

        rank, world = me.rank, me.world
        gpt = build_gpt_model(model, seed=0, layout=layout)
        mark_tp_groups(gpt)
        dense_file, expert_file = _file_names()
        owned = {n: t for n, t in _local_tensors(gpt, model).items()
                 if (ps.get_expert_data_parallel_rank() if _is_expert(t) else ps.get_data_parallel_rank()) == 0}
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
                    files.setdefault(expert_file if _is_expert(t) else dense_file, {})[name] = piece.clone()
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


def read_sharded(mcore_dir: Path, out_dir: Path, like: Path) -> Path:
    """A sharded megatron-core directory back to HF with ``like``'s shard layout: the layout's ranks load their
    shards, the whole tensors are gathered so that rank 0 then holds the whole model, and rank 0 writes."""
    from trainer.convert.hf_mcore import like_weight_map, read_mcore_model

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
        _launch(_read_rank, world, mcore_dir, tmp, like, like_map, layout, model)
    return out_dir


def _read_rank(mcore_dir: Path, out: Path, like: Path, like_map: dict[str, str], layout: Layout,
               model: Model) -> None:
    from trainer.parallel.rank import rank_session

    # conversion moves host tensors between files: the CPU platform (rank_session's default) whatever the machine has
    with rank_session(layout) as me:  # first: it quiets megatron's import warnings
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from trainer.convert.hf_mcore import write_hf_like
        from trainer.models.build import build_gpt_model
        from trainer.parallel.gather import global_name, whole_tensors

        rank, world = me.rank, me.world
        gpt = build_gpt_model(model, seed=0, layout=layout)
        local = _local_tensors(gpt, model)
        for name, t in own_shard(gpt, mcore_dir).items():
            local[name].data = t  # its stored dtype, so the gathered tensors are the stored ones bit for bit
        whole = whole_tensors(gpt, model.shape.vocab)
        # mapped buffers are replicated over TP and DP: the first replica of each stage sends them
        buffers = {global_name(n, gpt): b.data for n, b in gpt.named_buffers() if n in local}
        mine = buffers if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 else {}
        received = [None] * world if rank == 0 else None
        dist.gather_object(mine, received, dst=0)
        if rank == 0:
            whole |= {k: v for part in received for k, v in part.items()}
            write_hf_like(whole.items(), model, like, like_map, out, source=mcore_dir)
