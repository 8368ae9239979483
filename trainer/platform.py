"""What differs between a CPU rank and a GPU rank, chosen once at the entry point and handed down (DESIGN §5).

A ``Platform`` answers everything device-specific: the rank's device, the collective backend, how megatron
allocates and which spec provider builds its layers, the dtypes of a precision, FSDP2's mixed-precision
policy, memory statistics and seeding. The rest of the trainer asks the object it was given and never names a
device or a backend (``tests/trainer/test_platform.py`` enforces that).

    CpuPlatform   gloo; megatron's CPU initialisation with the CPU compat layer (``trainer.backends.cpu_compat``);
                  the torch spec provider; allgather MoE dispatch (gloo has no uneven all_to_all); RSS memory.
    CudaPlatform  ``cuda:LOCAL_RANK`` bound before any group; nccl for tensors, gloo for CPU-side objects;
                  Transformer Engine's spec provider when it imports (else the torch one); alltoall MoE dispatch
                  with grouped-GEMM experts; CUDA allocator statistics. (GPU) not verified here.

``choose_platform`` picks one from ``run.device`` (auto | cpu | cuda) and what the process sees.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.gpus import cuda_visible_devices

Precision = Literal["fp32", "bf16"]
HOST = torch.device("cpu")
"""Host memory: where files are read into and results leave a rank, whatever the platform computes on."""
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PlatformUnavailable(ValueError):
    """``run.device`` asks for a device this process does not have (bad input: one line, exit 2)."""


class Platform:
    """The interface every platform implements; the shared parts are here."""

    name: str
    device: torch.device
    collective_backend: str
    """``torch.distributed.init_process_group``'s backend (a per-device map where two are needed)."""

    def install(self) -> None:
        """Process-wide set-up before any model or group is built: torch twins of the kernel libraries this
        machine lacks (``trainer.models.kernel_fallbacks``), and on CPU the CPU compat patches."""
        from trainer.models import kernel_fallbacks

        kernel_fallbacks.install()
        if self.compile_blocker():
            # megatron wraps fused elementwise ops (router scores, output gates, bias-activations) in torch.compile,
            # whose kernels are built with a compiler against Python's headers; a bare machine may lack either:
            # they run as the eager functions they wrap (the same math) instead of failing at their first call
            import torch._dynamo

            torch._dynamo.config.disable = True

    def compile_blocker(self) -> str | None:
        """Why torch.compile cannot build this platform's kernels here (None: it can)."""
        compiler = self.compiler()
        if compiler is None:
            return "no compiler: torch.compile runs eager"
        if not python_headers():
            return f"{compiler} without Python.h: torch.compile runs eager"
        return None

    def compiler(self) -> str | None:
        """The compiler torch.compile builds this platform's kernels with, as torch looks for it (None: none)."""
        raise NotImplementedError

    def compiler_line(self) -> str:
        """What ``describe`` says of the compiler: the one torch.compile uses, or why it runs eager."""
        return self.compile_blocker() or str(self.compiler())

    def bind(self) -> None:
        """Make this rank's device the current one; called before any process group exists."""

    @property
    def mesh_device_type(self) -> str:
        """The device type of FSDP2's device meshes."""
        return self.device.type

    def param_dtype(self, precision: Precision) -> torch.dtype:
        return DTYPES[precision]

    def megatron_fields(self, precision: Precision, *, moe: bool) -> dict:
        """``TransformerConfig`` fields that depend on the device: where weights are initialised, their dtype,
        and for MoE the token dispatcher and expert GEMMs."""
        dtype = self.param_dtype(precision)
        fields = dict(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            use_cpu_initialization=self.megatron_initialises_on_host,
        )
        return fields | (self.moe_fields() if moe else {})

    megatron_initialises_on_host: bool

    def moe_fields(self) -> dict:
        raise NotImplementedError

    def spec_provider(self, precision: Precision):
        """An instance of megatron's ``BackendSpecProvider`` the families build their layer specs through, for a
        model computing in ``precision``."""
        raise NotImplementedError

    def fsdp_policy(self, param_dtype: Precision, reduce_dtype: Precision):
        """FSDP2's ``MixedPrecisionPolicy``: parameters gathered in ``param_dtype``, gradients reduced in
        ``reduce_dtype``; the sharded master weights stay fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors on this rank's device (the same tensors where they are there already)."""
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        """A result that leaves the rank (returned to the launcher, written to a file) in host memory."""
        return tensor.to(HOST)

    def seed(self, seed: int) -> None:
        """Seed torch's generators for this device (megatron's TP tracker is seeded by the model builder)."""
        torch.manual_seed(seed)

    def engine_environment(self, replica: int, tp: int) -> dict[str, str]:
        """What rollout engine ``replica`` (of ``tp`` devices each) is started with so that it runs on devices of
        its own: the platform's device variable naming its slice of this process's devices (none on the CPU)."""
        return {}

    def rng_state(self) -> dict[str, torch.Tensor]:
        """This process's generator states (the host's, and the device's where it has its own), for an exact
        resume; megatron's TP tracker is saved beside them by its backend."""
        return {"torch": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``rng_state`` returned."""
        torch.set_rng_state(state["torch"])

    def describe(self) -> dict[str, str]:
        """What this platform runs on, for reports (``trainer.smoke``'s header)."""
        raise NotImplementedError

    def memory(self) -> dict[str, float]:
        """Memory of this process now, MiB: ``peak`` (since the last ``reset_peak``) and ``allocated``."""
        raise NotImplementedError

    def reset_peak(self) -> None:
        """Start a new peak (a stage's own peak); a no-op where the platform cannot reset it."""

    def memory_metrics(self) -> dict[str, float]:
        """The process-wide peak metrics of an episode row."""
        raise NotImplementedError


def python_headers() -> bool:
    """Whether Python's C headers are installed where Triton and inductor look for them (``Python.h``: Triton
    builds every kernel's launcher as a Python extension; apt's python3.x without -dev lacks it)."""
    import sysconfig

    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme  # as triton.runtime.build takes it
    return os.path.isfile(os.path.join(sysconfig.get_paths(scheme=scheme)["include"], "Python.h"))


def _rss_mib() -> tuple[float, float]:
    """(peak since the process started, current) resident set size in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best this process can say
        current = peak
    return peak, current


class CpuPlatform(Platform):
    name = "cpu"
    device = HOST
    collective_backend = "gloo"
    megatron_initialises_on_host = True

    def install(self) -> None:
        from trainer.backends import cpu_compat

        super().install()
        cpu_compat.install()

    def moe_fields(self) -> dict:
        # gloo has no uneven all_to_all: the allgather dispatcher, experts one GEMM each, no fused permute.
        return dict(moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_permute_fusion=False)

    def spec_provider(self, precision: Precision):
        from trainer.models.specs import TorchSpecProvider

        return TorchSpecProvider()

    def compiler(self) -> str | None:
        # inductor's C++ kernels: torch's own search (CXX, then g++)
        from torch._inductor import cpp_builder, exc

        try:
            return cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            return None

    def describe(self) -> dict[str, str]:
        return {"device": f"cpu ({os.cpu_count()} cores)", "collectives": self.collective_backend,
                "compiler": self.compiler_line()}

    def memory(self) -> dict[str, float]:
        # ru_maxrss cannot be reset: a stage's peak on CPU is the process's peak so far.
        peak, current = _rss_mib()
        return {"peak": peak, "allocated": current}

    def memory_metrics(self) -> dict[str, float]:
        return {"memory/peak_rss_mib": _rss_mib()[0]}


class CudaPlatform(Platform):
    """One GPU per rank: ``cuda:local_rank``. (GPU) not verified here."""

    name = "cuda"
    # CUDA tensors go through nccl, CPU tensors (object collectives, CPU-side counters) through gloo, in the
    # same groups: torch's per-device backend map.
    collective_backend = "cpu:gloo,cuda:nccl"
    megatron_initialises_on_host = False

    def __init__(self, local_rank: int):
        self.local_rank = local_rank
        self.device = torch.device("cuda", local_rank)
        self.has_te = importlib.util.find_spec("transformer_engine") is not None
        self._peak_before_reset = 0.0  # MiB: the process's peak, which reset_peak would otherwise lose

    def bind(self) -> None:
        torch.cuda.set_device(self.device)
        # this run's peak from its start: an earlier run in the same process (the smoke's fp32 cell before its
        # bf16 one) left its own in the allocator's statistics
        torch.cuda.reset_peak_memory_stats(self.device)

    def moe_fields(self) -> dict:
        # The seeds' dispatch: alltoall; experts as TE's grouped GEMM where TE is present (without TE megatron's
        # grouped experts need the separate grouped_gemm package, so each expert is its own GEMM).
        return dict(
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=self.has_te, moe_permute_fusion=False
        )

    def spec_provider(self, precision: Precision):
        if self.has_te:
            from trainer.models.specs import te_spec_provider

            return te_spec_provider(torch_attention=precision == "fp32")
        from trainer.models.specs import TorchSpecProvider

        return TorchSpecProvider()

    def engine_environment(self, replica: int, tp: int) -> dict[str, str]:
        # the devices this process sees, in its numbering: replica i takes the i-th run of tp of them
        visible = cuda_visible_devices()
        devices = visible if visible is not None else [str(i) for i in range(torch.cuda.device_count())]
        mine = devices[replica * tp:(replica + 1) * tp]
        if len(mine) < tp:
            raise PlatformUnavailable(f"rollout engine {replica} needs GPUs {replica * tp}..{(replica + 1) * tp - 1} "
                                      f"of this process, which sees {len(devices)}; use fewer rollout.engines")
        return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}

    def rng_state(self) -> dict[str, torch.Tensor]:
        return super().rng_state() | {"cuda": torch.cuda.get_rng_state(self.device)}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        super().set_rng_state(state)
        if "cuda" in state:  # a checkpoint written on the CPU platform has none
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def compiler(self) -> str | None:
        # Triton builds each kernel's launcher with a C compiler: CC, else gcc, else clang (triton.runtime.build)
        import shutil

        return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def describe(self) -> dict[str, str]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)",
            "collectives": f"{self.collective_backend} (NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})",
            "cuda": str(torch.version.cuda),
            # an fp32 run's matmuls and convolutions may round through TF32 (torch's flags; TE's fp32 GEMMs too)
            "tf32": f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}",
            "compiler": self.compiler_line(),
        }

    def memory(self) -> dict[str, float]:
        return {
            "peak": torch.cuda.max_memory_allocated(self.device) / 2**20,
            "allocated": torch.cuda.memory_allocated(self.device) / 2**20,
        }

    def reset_peak(self) -> None:
        self._peak_before_reset = max(self._peak_before_reset, torch.cuda.max_memory_allocated(self.device) / 2**20)
        torch.cuda.reset_peak_memory_stats(self.device)

    def memory_metrics(self) -> dict[str, float]:
        return {
            "memory/peak_rss_mib": _rss_mib()[0],
            "memory/peak_device_mib": max(self._peak_before_reset,
                                          torch.cuda.max_memory_allocated(self.device) / 2**20),
        }


CPU = CpuPlatform()
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RankResources:
    """What one rank reserves on a Ray cluster: host cores and GPUs (``trainer.parallel.ray_launcher``)."""

    cpus: int
    gpus: int

    def bundle(self, ranks: int) -> dict[str, int]:
        """A placement-group bundle of ``ranks`` ranks, in Ray's resource names."""
        return {"CPU": self.cpus * ranks} | ({"GPU": self.gpus * ranks} if self.gpus else {})


def rank_resources(cluster: dict[str, float], world_size: int) -> RankResources:
    """A GPU and a host core per rank where the Ray cluster (its total resources ``cluster``) has a GPU for every
    rank; a host core otherwise (the CPU platform's processes)."""
    return RankResources(cpus=1, gpus=1 if cluster.get("GPU", 0) >= world_size else 0)


def visible_gpus() -> int:
    """GPUs this process can use (0 without CUDA): what the preflight compares a recipe's ``gpus`` with."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_platform(device: str = "auto", local_rank: int | None = None) -> Platform:
    """The platform of this process: ``run.device`` (auto | cpu | cuda) against what the process sees.

    ``auto`` takes a GPU when CUDA is available; ``cuda`` without one is refused in one line naming the fix.
    ``local_rank`` defaults to the launcher's ``LOCAL_RANK`` (0 for a single process).
    """
    if device not in DEVICES:
        raise PlatformUnavailable(f"run.device: {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        raise PlatformUnavailable(
            "run.device: cuda, but this process sees no CUDA device (torch "
            f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "use run.device=auto or cpu, or a CUDA build of torch on a GPU machine"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if local_rank >= torch.cuda.device_count():
        raise PlatformUnavailable(
            f"run.device: local rank {local_rank} has no GPU (this machine shows "
            f"{torch.cuda.device_count()}); start at most that many ranks per machine"
        )
    return CudaPlatform(local_rank)
