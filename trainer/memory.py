"""Peak memory of this process, for metrics.jsonl: resident set size on CPU, allocated device memory on GPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_metrics() -> dict[str, float]:
    """`memory/peak_rss_mib` (this process, since it started) and, with CUDA, `memory/peak_device_mib`."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    metrics = {"memory/peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available():  # (GPU) not verified here
        metrics["memory/peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return metrics
