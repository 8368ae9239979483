"""cpu_compat: idempotent, and the megatron-core code each patch serves computes the right thing on CPU."""

import pytest
import torch
from megatron.core import utils
from megatron.core.tensor_parallel import random as mcore_random

from trainer.backends import cpu_compat

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="cpu_compat patches torch.cuda process-wide: not on a machine whose other tests use CUDA"
)


def test_install_is_idempotent():
    assert cpu_compat.install() is True
    patched = (
        torch.cuda.current_device,
        utils.GlobalMemoryBuffer.get_tensor,
        mcore_random.CudaRNGStatesTracker.fork,
    )
    assert cpu_compat.install() is True
    assert (
        torch.cuda.current_device,
        utils.GlobalMemoryBuffer.get_tensor,
        mcore_random.CudaRNGStatesTracker.fork,
    ) == patched
    assert cpu_compat.installed()


def test_memory_buffer_allocates_on_cpu_and_reuses():
    cpu_compat.install()
    buf = utils.GlobalMemoryBuffer()
    a = buf.get_tensor((4, 8), torch.float32, "x")
    b = buf.get_tensor((2, 3), torch.float32, "x")
    assert a.device.type == "cpu" and a.shape == (4, 8) and b.shape == (2, 3)
    assert b.data_ptr() == a.data_ptr()  # same scratch storage, as on the GPU


def test_rng_tracker_fork_uses_named_stream_and_restores_outer():
    cpu_compat.install()
    tracker = mcore_random.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), outer_expected)  # caller's stream untouched
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    with tracker.fork("model-parallel-rng"):
        again = torch.rand(3)
    assert not torch.equal(again, inside)  # the named stream advanced


def test_megatron_allocates_on_the_current_device():
    cpu_compat.install()
    x = torch.zeros(3, device=torch.cuda.current_device())  # megatron's idiom for "this rank's device"
    assert x.device.type == "cpu"

