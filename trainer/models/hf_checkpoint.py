"""HF checkpoints on disk: ``config.json`` + safetensors, written atomically, read single-file or sharded.

The reader is the path hub checkpoints take (``model.safetensors`` or ``model.safetensors.index.json`` with
its shards); the writer produces what ``AutoModelForCausalLM.from_pretrained`` and vLLM / SGLang load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from trainer.platform import HOST

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def save_hf_checkpoint(
    directory: str | os.PathLike, tensors: dict[str, Tensor], hf_config: PretrainedConfig
) -> Path:
    """Write ``tensors`` and ``hf_config`` to ``directory``, replacing it atomically.

    Files go to a temporary sibling directory first, which is renamed into place, so a reader never sees a
    half-written checkpoint (a crash leaves the old one, or none).
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # safetensors refuses tensors that share storage (tied weights) and non-contiguous views.
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            tmp / WEIGHTS,
            metadata={"format": "pt"},
        )
        hf_config.save_pretrained(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_hf_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Tensor], PretrainedConfig]:
    """(tensors, config) of an HF checkpoint directory; shards listed in the index are all read."""
    root = Path(directory)
    config = AutoConfig.from_pretrained(root)
    if (root / INDEX).exists():
        shards = sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
    elif (root / WEIGHTS).exists():
        shards = [WEIGHTS]
    else:
        raise FileNotFoundError(f"{root} has neither {WEIGHTS} nor {INDEX}")
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        tensors.update(load_file(root / shard, device=HOST.type))
    return tensors, config
