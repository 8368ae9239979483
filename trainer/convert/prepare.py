"""A matrix model's ``prepare`` steps, in order, on a downloaded HF checkpoint.

``OUT/hf`` becomes the prepared HF checkpoint (fp8 cast into it, or the input's shards hard-linked when the
filesystem allows, else copied) and its config.json gets the config steps; an ``hf-to-mcore`` step writes
``OUT/mcore``. Steps: fp8-to-bf16 {block}, drop-config-key {key}, set-config {key: value, ...},
hf-to-mcore {gpus: informational, the seeds' conversion job size}.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from matrix.schema import PrepareStep
from trainer.convert import ConvertError
from trainer.convert.config_steps import drop_config_key, set_config


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


def prepare(steps: list[PrepareStep], in_dir: Path, out_dir: Path) -> list[str]:
    """Run ``steps`` from ``in_dir`` into ``out_dir``; returns one line per step done."""
    from trainer.convert.fp8 import fp8_to_bf16
    from trainer.convert.hf_mcore import hf_to_mcore

    hf = out_dir / "hf"
    if hf.exists():
        raise ConvertError(f"{hf}: already exists; choose a new output directory")
    done = []
    if steps and steps[0].step == "fp8-to-bf16":
        fp8_to_bf16(in_dir, hf, block=steps[0].args.get("block"))
        done.append(f"fp8-to-bf16 → {hf}")
        steps = steps[1:]
    else:
        _link_or_copy(in_dir, hf)
    for step in steps:
        if step.step == "fp8-to-bf16":
            raise ConvertError("prepare: fp8-to-bf16 must be the first step")
        if step.step == "drop-config-key":
            drop_config_key(hf, str(step.args["key"]))
            done.append(f"drop-config-key {step.args['key']}")
        elif step.step == "set-config":
            set_config(hf, [f"{k}={json.dumps(v)}" for k, v in step.args.items()])
            done.append(f"set-config {', '.join(step.args)}")
        elif step.step == "hf-to-mcore":
            hf_to_mcore(hf, out_dir / "mcore")
            done.append(f"hf-to-mcore → {out_dir / 'mcore'}")
    return done
