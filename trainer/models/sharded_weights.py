"""Sharded megatron-core directories: what they hold, and each rank reading its own files.

The format (``mcore.json`` with the layout's degrees, ``dense-tp{T}-pp{P}`` and ``experts-pp{P}-ep{E}-etp{X}``
files keyed by each rank's LOCAL parameter names, expert weights named as ``gather.canonical_name`` names them):
``own_shard`` reads a rank's part back in a run with the same degrees (``trainer.models.pretrained``);
``trainer.convert.sharded`` writes and reads whole directories with the layout's ranks. What a shard is comes from
megatron's own parameter attributes (``trainer.parallel.gather``). Besides parameters, a file holds the persistent
buffers the family maps to HF tensors (the router's expert bias).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

# Only light imports at module level: spawned ranks import this module before rank_session quiets megatron.
from matrix.schema import Layout, Model
from trainer.models.weight_files import MCORE_INDEX, MCORE_META, WeightsError, read_mcore_model, weight_map

ONE_PROCESS = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "first_stage_layers": None, "last_stage_layers": None}


def layout_degrees(layout: Layout) -> dict:
    first, last = (layout.first_stage_layers, layout.last_stage_layers) if layout.pp > 1 else (None, None)
    return {
        "tp": layout.tp,
        "pp": layout.pp,
        "ep": layout.ep,
        "etp": layout.expert_tp,
        "first_stage_layers": first,
        "last_stage_layers": last,
    }


def process_degrees(model: torch.nn.Module) -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "first_stage_layers": model.config.num_layers_in_first_pipeline_stage,
        "last_stage_layers": model.config.num_layers_in_last_pipeline_stage,
    }


def describe_degrees(degrees: object) -> str:
    """``tp=2 pp=1 ...`` (as mcore.json or a process has them; a malformed value is shown as it is)."""
    if not isinstance(degrees, dict):
        return f"degrees {degrees!r}"
    return " ".join(f"{k}={v}" for k, v in degrees.items() if v is not None)


def check_files(mcore_dir: Path, meta: dict) -> None:
    """Every shard file ``mcore.json`` lists is there (each rank checks its own files' contents)."""
    missing = sorted(f for f in meta.get("files", {}) if not (mcore_dir / f).is_file())
    if missing:
        raise WeightsError(f"{mcore_dir}: shard {missing[0]} listed in {MCORE_META} is missing")


def layout_named(degrees: dict) -> str:
    """A matrix layout with these degrees (what to convert with), or the degrees themselves."""
    from matrix import load_matrix

    if degrees == ONE_PROCESS:
        return "single"
    names = [n for n, lay in load_matrix().layouts.items() if not lay.fsdp and layout_degrees(lay) == degrees]
    return names[0] if names else f"<a matrix layout with {describe_degrees(degrees)}>"


# ------------------------------------------------------------------ a rank's tensors and files


def local_tensors(gpt: torch.nn.Module, model: Model) -> dict[str, Tensor]:
    """Local name → parameter, and the persistent buffers the family maps to HF tensors, of this rank's model."""
    from trainer.models.weight_map import rules
    from trainer.parallel.gather import canonical_name, global_name

    mapped_buffers = {rule.mcore for rule in rules(model) if rule.buffer}
    named = {canonical_name(n): p for n, p in gpt.named_parameters()}
    named |= {n: b for n, b in gpt.named_buffers() if global_name(n, gpt) in mapped_buffers}
    return named


def is_expert(t: Tensor) -> bool:
    return not getattr(t, "allreduce", True)


def file_names() -> tuple[str, str]:
    """(dense file, expert file) of this rank."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_rank()
    return (
        f"dense-tp{ps.get_tensor_model_parallel_rank():02d}-pp{pp:03d}.safetensors",
        f"experts-pp{pp:03d}-ep{ps.get_expert_model_parallel_rank():03d}"
        f"-etp{ps.get_expert_tensor_parallel_rank():02d}.safetensors",
    )


def own_shard(model: torch.nn.Module, mcore_dir: Path) -> dict[str, Tensor]:
    """This rank's tensors of a megatron-core directory, keyed by local parameter (and mapped buffer) name:
    the union of its dense and expert files, in their stored dtype, checked against the model's names and shapes.

    Needs megatron's ``parallel_state`` set up with the degrees the directory was written for (the unsharded
    form counts as every degree 1); other degrees are refused in one line naming both and the fix.
    """
    described, model_meta = read_mcore_model(Path(mcore_dir))
    written = model_meta.get("degrees", ONE_PROCESS)
    running = process_degrees(model)
    if written != running:
        raise WeightsError(
            f"{mcore_dir}: written for layout {model_meta.get('layout')} ({describe_degrees(written)}), this process runs "
            f"{describe_degrees(running)}; convert again with --layout {layout_named(running)} or use the unsharded form"
        )
    expected = local_tensors(model, described)
    if "degrees" not in model_meta:  # one process: local names are the global names
        from safetensors.torch import load_file

        tensors = {}
        for shard in sorted(set(weight_map(Path(mcore_dir), index=MCORE_INDEX, single=None).values())):
            tensors |= load_file(Path(mcore_dir) / shard)
    else:
        dense, experts = file_names()
        has_experts = any(is_expert(t) for t in expected.values())
        tensors = _read_file(Path(mcore_dir) / dense) | (
            _read_file(Path(mcore_dir) / experts) if has_experts else {}
        )
    for name, t in expected.items():
        if name not in tensors:
            raise WeightsError(f"{mcore_dir}: no tensor for {name!r} of this rank ({file_names()[0]})")
        if tensors[name].shape != t.shape:
            raise WeightsError(
                f"{mcore_dir}: tensor {name!r} has shape {tuple(tensors[name].shape)}, this rank's "
                f"model has {tuple(t.shape)}"
            )
    strangers = sorted(set(tensors) - set(expected))
    if strangers:
        raise WeightsError(f"{mcore_dir}: tensor {strangers[0]!r} is not a parameter of this rank's model")
    return tensors


def _read_file(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"{path}: not found (the directory is incomplete)")
    return load_file(path)
