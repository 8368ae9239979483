"""Values the bench derives from a run's own rows: per-device throughput and MFU.

MFU = model training FLOPs / seconds / peak (REFERENCE §8), with training FLOPs = 3 × forward FLOPs per token
(`trainer.models.flops.flops_per_token` at the episode's mean sequence length) × tokens × optimizer steps.
`bench/mfu_train` divides by the train stage's seconds, `bench/mfu_episode` by the whole episode's.
"""

from __future__ import annotations

from matrix.schema import Model
from trainer.models.flops import flops_per_token

PER_DEVICE = {
    "throughput/tokens_per_s": "bench/tokens_per_s_per_device",
    "throughput/generation_tokens_per_s": "bench/generation_tokens_per_s_per_device",
    "throughput/train_tokens_per_s": "bench/train_tokens_per_s_per_device",
}


def derive(row: dict, config: dict, peak_flops_per_s: float) -> dict:
    """`row` (one metrics.jsonl line) plus the bench/* values; `config` is the run's config.json."""
    resolved = config["resolved"]
    recipe, model = resolved["recipe"], Model.model_validate(resolved["model"])
    devices = recipe["gpus"]
    out = dict(row)
    for key, per_device in PER_DEVICE.items():
        if key in row:
            out[per_device] = row[key] / devices
    tokens = row.get("tokens/prompt", 0) + row.get("tokens/response", 0)
    sequences = recipe["grpo"]["prompts_per_episode"] * recipe["grpo"]["samples_per_prompt"]
    try:
        forward = flops_per_token(model, round(tokens / sequences))
    except NotImplementedError:  # a family whose FLOPs are not counted: no MFU rather than a wrong one
        return out
    train_flops = 3 * forward * tokens * recipe["grpo"]["steps_per_episode"]
    out["bench/train_flops"] = train_flops
    for stage, key in (("time/train", "bench/mfu_train"), ("time/episode", "bench/mfu_episode")):
        if row.get(stage):
            out[key] = train_flops / row[stage] / peak_flops_per_s
    return out
