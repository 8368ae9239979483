"""What a Ray rank was given, written for test_ray_gpus.py (the rank runs this as its entry point)."""

import json
import os
from pathlib import Path


def record_gpus(out_dir: str) -> None:
    import ray

    seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")}
    seen["ray_gpu_ids"] = [str(gpu) for gpu in ray.get_gpu_ids()]
    (Path(out_dir) / f"rank-{seen['RANK']}.json").write_text(json.dumps(seen))
