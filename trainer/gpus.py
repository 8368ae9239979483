"""The GPUs a process may use and how full they are, read without torch or a CUDA context: CUDA_VISIBLE_DEVICES,
nvidia-smi, NVML. For the steps that must answer before anything touches a GPU (a refusal in seconds, a rollout
engine sizing its share of a GPU the trainer already holds memory on)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess


def cuda_visible_devices() -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs), in the order the process numbers them;
    None where it is unset (every GPU visible)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [d.strip() for d in visible.split(",") if d.strip()]


def host_gpus() -> int:
    """GPUs this host has (nvidia-smi), as many as CUDA_VISIBLE_DEVICES leaves visible where it is set."""
    if shutil.which("nvidia-smi") is None:
        return 0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    count = sum(line.startswith("GPU ") for line in done.stdout.splitlines()) if done.returncode == 0 else 0
    visible = cuda_visible_devices()
    return count if visible is None else min(count, len(visible))


def fullest_gpu(nvml, count: int) -> tuple[int, int]:
    """(bytes in use, total bytes) of the fullest of this process's first ``count`` GPUs, through ``nvml`` (the
    ``pynvml`` module an engine's image ships: NVML numbers GPUs physically, whatever CUDA_VISIBLE_DEVICES says)."""
    visible = cuda_visible_devices()
    nvml.nvmlInit()
    try:
        readings = []
        for index in range(count):
            entry = str(index) if visible is None else visible[index]
            handle = (nvml.nvmlDeviceGetHandleByUUID(entry) if entry.startswith(("GPU-", "MIG-"))
                      else nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            readings.append((int(memory.used), int(memory.total)))
        return max(readings)
    finally:
        nvml.nvmlShutdown()


def check_engine_share(requested: float, in_use: int, total: int) -> None:
    """Raises ValueError, naming the largest share that would fit, when an engine's ``requested`` share of a GPU
    does not fit beside the ``in_use`` bytes (of ``total``) already held there (a colocated trainer)."""
    if requested * total > total - in_use:
        gib = 2**30
        raise ValueError(
            f"rollout.gpu_memory_utilization {requested} asks for {requested * total / gib:.1f} GiB of a "
            f"{total / gib:.1f} GiB GPU on which {in_use / gib:.1f} GiB are held already (the colocated trainer): "
            f"lower it to at most {math.floor((total - in_use) / total * 100) / 100:.2f}, or give the trainer more GPUs"
        )
