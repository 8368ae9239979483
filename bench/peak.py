"""The device peak that MFU is measured against: declared figures for GPUs, a measured matmul peak for the CPU.

On CPU there is no datasheet number that means anything for torch, so the bench times large fp32 matmuls
at the start of a suite (all threads torch uses) and records that peak in the result. MFU on CPU is then
"the share of what torch's matmul reaches on this machine"; every CPU process of a layout shares that one
peak, so the machine counts as one device for MFU.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel

# Dense bf16 tensor-core peaks, FLOP/s per GPU (datasheets, without sparsity). REFERENCE §8: H100/H200 989 TF.
DECLARED_GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class Peak(BaseModel):
    device: str
    flops_per_s: float
    """Per device (GPU) or for the whole machine (CPU)."""
    per_device: bool
    source: str

    def total(self, devices: int) -> float:
        """The peak of `devices` devices: GPUs add up; CPU processes share one machine."""
        return self.flops_per_s * (devices if self.per_device else 1)


def measure_cpu_matmul_peak(size: int = 1024, calls: int = 8, trials: int = 5) -> Peak:
    """Best fp32 matmul rate over `trials` timings of `calls` (size × size) @ (size × size) products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # first call pays for thread start-up
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    flops = 2 * size**3 * calls / best
    return Peak(device="cpu", flops_per_s=flops, per_device=False,
                source=f"measured: fp32 torch.mm {size}x{size}, best of {trials}x{calls}, "
                       f"{torch.get_num_threads()} threads")


def declared_gpu_peak(name: str) -> Peak:
    """The datasheet peak of the GPU whose name contains a known model ("NVIDIA H100 80GB HBM3" → H100)."""
    for model, flops in DECLARED_GPU_PEAKS.items():
        if model in name:
            return Peak(device=name, flops_per_s=flops, per_device=True, source=f"declared: {model} dense bf16")
    raise ValueError(f"no declared peak for GPU {name!r}; known: {', '.join(DECLARED_GPU_PEAKS)}")


def device_peak() -> Peak:
    """The peak of the device runs use here: the first CUDA GPU if there is one, else the CPU (measured)."""
    if torch.cuda.is_available():  # (GPU) not verified here
        return declared_gpu_peak(torch.cuda.get_device_name(0))
    return measure_cpu_matmul_peak()
