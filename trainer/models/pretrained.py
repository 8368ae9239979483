"""Where a run's starting weights come from, whether they fit the recipe's model, and reading them lazily.

A matrix model's weights are, in order: its ``weights`` directory, else the snapshot of its ``hf_id`` in the
local Hugging Face cache, else none (the seed's random initialisation: the tiny CPU stand-ins). A directory
is one of these kinds, told apart by the files it holds:

    hf             config.json + model.safetensors, or model.safetensors.index.json and its shards
    mcore          mcore.json ("layout": "single") + mcore.safetensors.index.json and its shards, written by
                   ``python -m trainer.convert hf-to-mcore``: whole tensors under global megatron names
    mcore-sharded  mcore.json with a model-parallel "layout" and "degrees" (``hf-to-mcore --layout``): each
                   rank reads its own files (``trainer.models.sharded_weights.own_shard``); only a megatron-core run
                   with the same TP/PP/EP/ETP degrees can load it

``check`` runs in the launching process, before any rank starts, and refuses a directory whose config does
not describe the recipe's model (or, sharded, whose degrees are not the run's). Ranks then read through a lazy
mapping (``megatron_shards`` for the megatron backend, ``hf_tensors`` for FSDP): a tensor is read from its
safetensors file only when the backend asks for it, so a rank holds one whole tensor at a time, never the
whole model; from a sharded directory a rank reads only its own files.

Runs read; ``trainer.convert`` (offline) writes. Nothing here imports the converter: what both read lives on
this side (``weight_files``, ``shapes``, ``sharded_weights``, ``config.model_from_hf_config``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from matrix.schema import Layout, Model, MoE
from trainer.models.weight_files import (
    HF_INDEX,
    HF_SINGLE,
    MCORE_INDEX,
    MCORE_META,
    WeightsError,
    read_json,
    read_mcore_model,
    read_tensor,
    weight_map,
)
from trainer.models.weight_map import Rule, rules

HF, MCORE, MCORE_SHARDED = "hf", "mcore", "mcore-sharded"


# ------------------------------------------------------------------ where the weights are


def hub_snapshot(hf_id: str) -> Path | None:
    """The snapshot directory of ``hf_id`` in the local Hugging Face cache (never the network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = try_to_load_from_cache(hf_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def source(model: Model) -> Path | None:
    """The directory ``model`` starts from (``weights``, else the hub cache), or None for random init."""
    if model.weights:
        return Path(model.weights).expanduser()
    return hub_snapshot(model.hf_id) if model.hf_id else None


def kind(directory: Path) -> str:
    """Which kind of weights directory this is (module docstring); WeightsError if none."""
    if not directory.is_dir():
        raise WeightsError(f"{directory}: not a directory")
    if (directory / MCORE_META).is_file():
        return MCORE if read_json(directory / MCORE_META).get("layout", "single") == "single" else MCORE_SHARDED
    if (directory / "config.json").is_file() and ((directory / HF_SINGLE).is_file() or (directory / HF_INDEX).is_file()):
        return HF
    raise WeightsError(f"{directory}: no weights found; expected config.json with {HF_SINGLE} or {HF_INDEX} (an HF "
                       f"checkpoint), or {MCORE_META} with {MCORE_INDEX} (python -m trainer.convert hf-to-mcore)")


# ------------------------------------------------------------------ does it fit the recipe


def described(directory: Path) -> Model:
    """The model a weights directory's own config describes (family, dtype, shape)."""
    from trainer.models.config import (
        model_from_hf_config,  # megatron: imported only when a directory is checked
    )

    if kind(directory) == HF:
        return model_from_hf_config(read_json(directory / "config.json"), where=directory / "config.json")
    return read_mcore_model(directory)[0]


def first_difference(ours: Model, theirs: Model) -> tuple[str, object, object] | None:
    """(dotted field, our value, theirs) of the first family or shape field that differs, or None."""
    if ours.family != theirs.family:
        return "family", ours.family, theirs.family
    return _first_difference("shape", _architecture(ours), _architecture(theirs))


def _architecture(model: Model) -> dict:
    """The shape's fields that describe the weights: a MoE's router training settings are the recipe's, and a
    checkpoint read back says the defaults (qwen3-next trains its router in fp64)."""
    return model.shape.model_dump(exclude={"moe": set(MoE.TRAINING_SETTINGS)} if model.shape.moe else None)


def _first_difference(where: str, ours: object, theirs: object) -> tuple[str, object, object] | None:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in ours:
            found = _first_difference(f"{where}.{key}", ours[key], theirs.get(key))
            if found:
                return found
        return None
    return None if ours == theirs else (where, ours, theirs)


def check(model: Model, model_name: str, layout: Layout, layout_name: str) -> Path | None:
    """The directory ``model`` starts from, checked: it exists, holds weights of a kind that can be loaded by a
    run with ``layout``, and its config describes ``model``; None for random init. Raises WeightsError (one
    line)."""
    directory = source(model)
    if directory is None:
        return None
    label = "model.weights" if model.weights else f"the hub snapshot of {model.hf_id}"
    try:
        k = kind(directory)
        if k == MCORE_SHARDED:
            _check_degrees(directory, layout, layout_name)
        difference = first_difference(model, described(directory))
        if difference:
            field, ours, theirs = difference
            raise WeightsError(f"{directory}: {field} is {theirs!r} there but {ours!r} in matrix model {model_name}; "
                               f"use weights of that model, or a model whose {field} is {theirs!r}")
        _check_complete(directory, k, model)
    except WeightsError as exc:
        hint = ""
        if model.prepare and not model.weights:  # the hub release is not what trains until its steps have run
            hint = (f"; run its prepare steps (`python -m trainer.convert prepare {model_name} {directory} OUT`) and "
                    f"set model.weights=OUT/hf")
        raise WeightsError(f"{label}: {exc}{hint}") from None
    return directory


def _check_degrees(directory: Path, layout: Layout, layout_name: str) -> None:
    """A sharded directory loads only into a megatron-core run with the degrees it was written for."""
    from trainer.models.sharded_weights import describe_degrees, layout_degrees

    meta = read_json(directory / MCORE_META)
    fix = f"convert the HF checkpoint again with `--layout {layout_name}`, or without --layout (unsharded)"
    if layout.fsdp:
        raise WeightsError(f"{directory}: a sharded megatron-core directory (layout {meta.get('layout')}) and an FSDP "
                           f"run (layout {layout_name}): FSDP reads an HF checkpoint or an unsharded conversion; "
                           f"set model.weights to one of those")
    written, running = meta.get("degrees"), layout_degrees(layout)
    if written != running:
        raise WeightsError(f"{directory}: sharded for layout {meta.get('layout')} ({describe_degrees(written)}), but "
                           f"the run's layout {layout_name} has {describe_degrees(running)}; {fix}")


def _check_complete(directory: Path, k: str, model: Model) -> None:
    if k == MCORE_SHARDED:  # every rank checks its own files' names and shapes against its model (own_shard)
        from trainer.models.sharded_weights import check_files

        check_files(directory, read_json(directory / MCORE_META))
        return
    files = _files(directory, k)
    wanted = [n for r in rules(model) if not r.buffer for n in (r.hf if k == HF else (r.mcore,))]
    missing = [n for n in wanted if n not in files]
    if missing:
        raise WeightsError(f"{directory}: tensor {missing[0]!r} is missing ({len(missing)} of {len(wanted)} absent)")
    from trainer.models.shapes import check_shapes, expected_hf_shapes, expected_mcore_shapes

    # a tensor of another size would load into a traceback on every rank, after the run directory exists
    check_shapes(directory, files, expected_hf_shapes(model) if k == HF else expected_mcore_shapes(model))


# ------------------------------------------------------------------ reading, lazily


class LazyTensors(Mapping):
    """name → tensor, each read (and transformed) only when asked for, never kept."""

    def __init__(self, readers: dict[str, Callable[[], Tensor]]):
        self._readers = readers

    def __getitem__(self, name: str) -> Tensor:
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def _files(directory: Path, k: str) -> dict[str, str]:
    """tensor name → shard file, as stored."""
    return weight_map(directory) if k == HF else weight_map(directory, index=MCORE_INDEX, single=None)


def _stored(directory: Path, k: str) -> LazyTensors:
    return LazyTensors({name: (lambda n=name, f=file: read_tensor(directory, f, n))
                        for name, file in _files(directory, k).items()})


def _hf_as_mcore(directory: Path, model: Model) -> LazyTensors:
    """An HF checkpoint under global megatron names: each megatron tensor built from its HF tensors (q/k/v,
    gate/up fused) when asked for."""
    hf = _stored(directory, HF)

    def build(rule: Rule) -> Tensor:
        return rule.to_mcore(*(hf[n] for n in rule.hf))

    return LazyTensors({r.mcore: (lambda r=r: build(r)) for r in rules(model) if all(n in hf for n in r.hf)})


def _mcore_as_hf(directory: Path, model: Model) -> LazyTensors:
    """A megatron-core directory under HF names: each HF tensor cut from its megatron tensor when asked for."""
    mcore = _stored(directory, MCORE)

    def cut(rule: Rule, i: int) -> Tensor:
        return rule.to_hf(mcore[rule.mcore])[i]

    return LazyTensors({name: (lambda r=r, i=i: cut(r, i))
                        for r in rules(model) if r.mcore in mcore for i, name in enumerate(r.hf)})


# The dispatch on what a directory holds: one reader per kind, per name space the backends speak.
MEGATRON_READERS = {HF: _hf_as_mcore, MCORE: lambda d, _model: _stored(d, MCORE)}
HF_READERS = {HF: lambda d, _model: _stored(d, HF), MCORE: _mcore_as_hf}


def _reader(directory: Path, table: dict) -> Callable[[Path, Model], LazyTensors]:
    k = kind(directory)
    if k not in table:
        raise WeightsError(f"{directory}: a {k} directory cannot be read as whole tensors; use an HF checkpoint or "
                           f"an unsharded conversion")
    return table[k]


def megatron_shards(directory: Path, gpt: torch.nn.Module, model: Model) -> Iterator[tuple[Tensor, Tensor]]:
    """(parameter or mapped buffer of this rank's megatron model, the value it starts from): this rank's own
    files of a sharded directory, else this rank's shard of each whole tensor, read one at a time."""
    k = kind(directory)
    if k == MCORE_SHARDED:
        from trainer.models.sharded_weights import local_tensors, own_shard

        own = own_shard(gpt, directory)
        targets = local_tensors(gpt, model)
        return ((targets[name], tensor) for name, tensor in own.items())
    from trainer.parallel import gather  # megatron: imported by ranks, not by the launcher's check

    return gather.local_tensors_and_buffers(gpt, MEGATRON_READERS[k](directory, model))


def hf_tensors(directory: Path, model: Model) -> LazyTensors:
    """Whole tensors under HF names (what the FSDP backend's ``load_hf`` takes), read lazily."""
    return _reader(directory, HF_READERS)(directory, model)

