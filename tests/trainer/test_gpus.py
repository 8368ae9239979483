"""trainer.gpus: CUDA_VISIBLE_DEVICES read once for everyone, and an engine's fullest GPU found through NVML's
physical numbering (NVML itself is the GPU's: here a stand-in answers for four GPUs)."""

from types import SimpleNamespace

import pytest

from trainer.gpus import cuda_visible_devices, fullest_gpu, host_gpus

GIB = 2**30


class FourGpus:
    """NVML's calls that ``fullest_gpu`` makes, for physical GPUs 0..3 (GPU i holds 10·i GiB of 80; UUID GPU-i)."""

    def __init__(self):
        self.open = 0

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int):
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        return int(uuid.removeprefix("GPU-"))

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        return SimpleNamespace(used=10 * handle * GIB, total=80 * GIB)


@pytest.mark.parametrize(("visible", "expected"), [
    (None, None), ("", []), ("2,3", ["2", "3"]), (" 1 , GPU-3,", ["1", "GPU-3"]),
])
def test_cuda_visible_devices(monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert cuda_visible_devices() == expected


@pytest.mark.parametrize(("visible", "count", "used"), [
    (None, 2, 10),        # physical 0 and 1
    ("3,0", 1, 30),       # the process's GPU 0 is physical 3
    ("0,2,1", 2, 20),     # its first two: physical 0 and 2
    ("GPU-1,GPU-0", 2, 10),
])
def test_fullest_gpu_reads_the_processs_gpus_by_their_physical_number(monkeypatch, visible, count, used):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FourGpus()
    assert fullest_gpu(nvml, count) == (used * GIB, 80 * GIB)
    assert nvml.open == 0


def test_no_nvidia_smi_means_no_gpus(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert host_gpus() == 0
