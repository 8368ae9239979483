"""Make megatron-core 0.16.1 run on a machine without CUDA, by patching objects in memory.

megatron-core assumes a CUDA device in a handful of places that are not about compute: the current
device id, streams and events, a scratch buffer allocated on the GPU, and the CUDA RNG tracker. On CPU
each has an exact CPU meaning (one device, synchronous execution, CPU RNG), so the patches below
provide it. Megatron's files on disk are never edited (STYLE §3); everything here is undone by a new
interpreter. ``install()`` is idempotent; only the CPU platform (``trainer.platform``) calls it, so a CUDA rank never
sees the patches, and a CPU run on a machine with GPUs stays on the host.

Measured needs are listed in shared/REFERENCE.md §10.
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


class _CpuStream:
    """A CUDA stream on CPU: work is already ordered and synchronous, so every wait is immediate."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _CpuEvent:
    """A CUDA event on CPU: recorded work has already finished when the call returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _cpu_stream_context(stream):
    return contextlib.nullcontext()


def _patch_torch_cuda() -> None:
    # megatron allocates with device=torch.cuda.current_device(); "cpu" is a valid device for those calls.
    torch.cuda.current_device = lambda: "cpu"
    # Streams / events order GPU work (PP p2p, activation offload); CPU execution is already ordered.
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.stream = _cpu_stream_context


def _patch_memory_buffer() -> None:
    from megatron.core import utils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        # The original allocates its scratch buffer on the CUDA device; same logic, on CPU.
        numel = 1
        for size in tensor_shape:
            numel *= size
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype, device="cpu")
        return buf[0:numel].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    tracker = random.CudaRNGStatesTracker

    def add(self, name, seed):
        # The original seeds a CUDA generator; the CPU twin keeps a CPU generator state per name.
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # Swap the named state into the default CPU generator for the block (dropout in TP regions),
        # then store its advance and restore the caller's state, as the CUDA version does on the GPU.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    tracker.add = add
    tracker.fork = fork
    # Activation recomputation saves and restores "the CUDA RNG state" next to the CPU one; a host without
    # CUDA has no CUDA generator, and the CPU generator is already saved and restored by the caller.
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    random._set_cuda_rng_state = lambda *args, **kwargs: None


class _TorchOnCpu:
    """``torch`` as megatron's pipeline schedules see it: tensors they create on "cuda" are made on the CPU.

    ``schedules.py`` allocates its token counter with ``device="cuda"`` literally (not through
    ``current_device``); everything else is delegated to torch unchanged.
    """

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _cpu(kwargs: dict) -> dict:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))


def _patch_schedules() -> None:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchOnCpu()


def _patch_cp_rope() -> None:
    from megatron.core.models.common.embeddings import (
        rope_utils,
        rotary_pos_embedding,
        yarn_rotary_pos_embedding,
    )

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        # The original builds its chunk index in pinned memory and moves it to CUDA; same chunks, on CPU.
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1])
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[(seq_dim + 1):])
        pos_emb = pos_emb.index_select(seq_dim, index)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[(seq_dim + 2):])

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def _patch_output_gates() -> None:
    from trainer.models.kernel_fallbacks import has_gated_delta_net

    if not has_gated_delta_net():
        return
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.transformer.attention import Attention

    # Output gates (gated attention, the delta net's gated norm) are wrapped in torch.compile (megatron's
    # jit_fuser): on CPU that is an inductor C++ build per shape for a few elementwise ops; eager is the same math.
    for cls, name in ((GatedDeltaNet, "_apply_gated_norm"), (Attention, "_apply_output_gate")):
        fn = cls.__dict__[name]
        setattr(cls, name, getattr(fn, "_torchdynamo_orig_callable", fn))


def _patch_tied_embeddings() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.__dict__["setup_embeddings_and_output_layer"]
    if getattr(setup, "_grpo_cpu", False):
        return

    def setup_on_cpu(self, *args, **kwargs):
        # With tied embeddings under PP, the first and last stages all-reduce the shared weight after moving it
        # with `.cuda()`, which fails without CUDA; on CPU the weight is already on the one device.
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *a, **k: tensor
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    setup_on_cpu._grpo_cpu = True
    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu


def install() -> bool:
    """Apply the CPU patches once; returns True (they are active). The CPU platform (``trainer.platform``) calls
    it, also on a machine with CUDA when ``run.device: cpu`` keeps the run off the GPU: megatron must then
    allocate, seed and synchronise on the host."""
    global _INSTALLED
    if not _INSTALLED:
        _patch_torch_cuda()
        _patch_memory_buffer()
        _patch_rng_tracker()
        _patch_schedules()
        _patch_cp_rope()
        _patch_output_gates()
        _patch_tied_embeddings()
        _INSTALLED = True
    return True


def installed() -> bool:
    """Whether ``install()`` has patched this interpreter."""
    return _INSTALLED
