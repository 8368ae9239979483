"""The GPUs a process may use and how full they are, read without torch or a CUDA context: CUDA_VISIBLE_DEVICES,
nvidia-smi, NVML. For the steps that must answer before anything touches a GPU (a refusal in seconds, a rollout
engine sizing its share of a GPU the trainer already holds memory on)."""

from __future__ import annotations

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
