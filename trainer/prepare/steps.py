"""The plan of `prepare` for one recipe: which steps, in which order, reading and writing what.

Each step names its inputs and outputs (files or folders); ``run`` decides from the manifest whether it is done.
A step writes its output in a hidden temporary sibling renamed into place at the end, so a killed step leaves
nothing a later step could take for finished — except the resumable ones (downloads, the fp8 cast), which keep
their partial output beside the input hashes it was started from and continue it only from the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from matrix import Matrix, ResolvedRecipe
from matrix.schema import PrepareStep
from trainer.parallel.launcher import LOCAL, Placement
from trainer.prepare import PrepareError
from trainer.prepare.fetch import download
from trainer.prepare.manifest import size
from trainer.prepare.places import data_file, model_dir, prepared_root, weights_dir

MATH_REPO = "DigitalLearningGmbH/MATH-lighteval"
MATH_PATTERNS = ["data/*.parquet"]


@dataclass
class Step:
    id: str
    title: str
    inputs: list[Path]
    outputs: list[Path]
    action: Callable[[], None]
    estimate: Callable[[], int]
    """Bytes the step will write (checked against the free space before it starts)."""
    resumable: bool = False
    needs: list[str] = field(default_factory=list)


def classify(froms: list[Path]) -> tuple[Path | None, Path | None]:
    """(weights folder, data folder) among the ``--from`` folders: config.json → weights, *.parquet → data."""
    weights = data = None
    for d in froms:
        if not d.is_dir():
            raise PrepareError(f"--from {d}: not a folder")
        if (d / "config.json").is_file():
            weights = d
        elif any(d.rglob("*.parquet")):
            data = d
        else:
            raise PrepareError(f"--from {d}: neither weights (config.json with *.safetensors) nor data (*.parquet)")
    return weights, data


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    # config.json is edited by the steps: never share its inode with the input
    if (dst / "config.json").exists():
        (dst / "config.json").unlink()
        shutil.copy2(src / "config.json", dst / "config.json")


def _config_fixes(src: Path, out: Path, fixes: list) -> None:
    from trainer.convert.config_steps import drop_config_key, set_config
    from trainer.convert.shards import atomic_directory

    with atomic_directory(out) as tmp:
        tmp.rmdir()
        _link_or_copy(src, tmp)  # shards hard-linked where the filesystem allows; config.json copied
        for fix in fixes:
            if fix.step == "drop-config-key":
                drop_config_key(tmp, str(fix.args["key"]))
            else:
                set_config(tmp, [f"{k}={json.dumps(v)}" for k, v in fix.args.items()])


def _convert(hf: Path, out: Path, layout: str, placement: Placement = LOCAL) -> None:
    from trainer.convert.sharded import write_sharded

    write_sharded(hf, out, layout, placement)


def _cast(src: Path, out: Path, block) -> None:
    from trainer.convert.fp8 import fp8_to_bf16

    fp8_to_bf16(src, out, block=block)


def _math(raw: Path, out: Path) -> None:
    from trainer.data.math_lighteval import preprocess, write_rows

    rows = []
    for split in ("train", "test"):
        files = sorted(raw.rglob(f"{split}-*.parquet"))
        if split == "train" and not files:
            raise PrepareError(f"{raw}: no train-*.parquet (the MATH-lighteval layout: data/train-*.parquet, "
                               f"data/test-*.parquet)")
        for f in files:
            rows += preprocess(f, split)
    write_rows(rows, out)


def prepare_model_dir(steps: list[PrepareStep], in_dir: Path, out_dir: Path) -> list[str]:
    """A matrix model's prepare steps on a checkpoint already on disk, without a recipe's plan and manifest
    (``python -m trainer.convert prepare MODEL IN OUT``): ``OUT/hf`` the prepared HF checkpoint, ``OUT/mcore`` its
    unsharded conversion where the model declares ``hf-to-mcore``. Returns one line per step done."""
    hf = out_dir / "hf"
    if hf.exists():
        raise PrepareError(f"{hf}: already exists; choose a new output directory")
    if any(s.step == "fp8-to-bf16" for s in steps[1:]):
        raise PrepareError("prepare: fp8-to-bf16 must be the first step")
    done, src = [], in_dir
    if steps and steps[0].step == "fp8-to-bf16":
        src = out_dir / "bf16"
        _cast(in_dir, src, steps[0].args.get("block"))
        done.append(f"fp8-to-bf16 → {src}")
    fixes = [s for s in steps if s.step in ("drop-config-key", "set-config")]
    _config_fixes(src, hf, fixes)
    if src != in_dir:
        shutil.rmtree(src)  # OUT/hf holds hard links to (or copies of) the cast shards
    done += [f"{s.step} {', '.join(map(str, s.args.values() if s.step == 'drop-config-key' else s.args))}"
             for s in fixes]
    if any(s.step == "hf-to-mcore" for s in steps):
        _convert(hf, out_dir / "mcore", "single")
        done.append(f"hf-to-mcore → {out_dir / 'mcore'}")
    return done


def plan(matrix: Matrix, r: ResolvedRecipe, froms: list[Path], placement: Placement = LOCAL) -> list[Step]:
    """The steps recipe ``r`` needs, in order (empty: it needs nothing prepared); ``placement``: where a sharded
    conversion's ranks run."""
    given_weights, given_data = classify(froms)
    steps: list[Step] = []
    model, name = r.model, r.recipe.model
    if model.hf_id and not model.weights:
        base = model_dir(matrix, name)
        current = given_weights
        if current is None:
            current = base / "source"
            steps.append(Step(f"{name}/fetch", f"download {model.hf_id} ({model.hub})", [], [current],
                              lambda out=current: download(f"{name}/fetch", model.hf_id, out, hub=model.hub),
                              lambda: 0, resumable=True))
        cast = next((s for s in model.prepare if s.step == "fp8-to-bf16"), None)
        if cast:
            src, out = current, base / "bf16"
            steps.append(Step(f"{name}/fp8-to-bf16", "cast fp8 → bf16", [src], [out],
                              lambda src=src, out=out: _cast(src, out, cast.args.get("block")),
                              lambda src=src: 2 * size([src]), resumable=True))
            current = out
        fixes = [s for s in model.prepare if s.step in ("drop-config-key", "set-config")]
        src, hf = current, base / "hf"
        what = "; ".join(f"{s.step} {', '.join(map(str, s.args.values() if s.step == 'drop-config-key' else s.args))}"
                         for s in fixes) or "none"
        steps.append(Step(f"{name}/config", f"the HF folder, config fixes: {what}", [src], [hf],
                          lambda src=src, hf=hf: _config_fixes(src, hf, fixes),
                          lambda src=src, hf=hf: _linked_size(src, hf)))
        if r.recipe.trainer == "megatron":
            out = weights_dir(matrix, r)
            steps.append(Step(f"{name}/hf-to-mcore-{r.recipe.layout}",
                              f"megatron-core, sharded for layout {r.recipe.layout}", [hf], [out],
                              lambda hf=hf, out=out: _convert(hf, out, r.recipe.layout, placement),
                              lambda hf=hf: size([hf])))
    if r.recipe.data.source == "math-lighteval":
        raw = given_data
        if raw is None:
            raw = prepared_root(matrix) / "data" / "math-lighteval" / "source"
            steps.append(Step("data/math-lighteval/fetch", f"download {MATH_REPO} (huggingface)", [], [raw],
                              lambda raw=raw: download("data/math-lighteval/fetch", MATH_REPO, raw,
                                                       repo_type="dataset", patterns=MATH_PATTERNS),
                              lambda: 0, resumable=True))
        out = data_file(r)
        steps.append(Step("data/math-lighteval", "preprocess MATH-lighteval (boxed ground truths)", [raw], [out],
                          lambda raw=raw, out=out: _math(raw, out), lambda raw=raw: 2 * size([raw])))
    return steps


def _linked_size(src: Path, out: Path) -> int:
    """Hard links cost nothing on the same filesystem; else the shards are copied."""
    probe = out.parent if out.parent.exists() else prepared_root_of(out)
    return 0 if src.exists() and probe.exists() and src.stat().st_dev == probe.stat().st_dev else size([src])


def prepared_root_of(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def clear(step: Step) -> None:
    """Remove what a step that is not done left behind (its outputs as they stand)."""
    for out in step.outputs:
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
