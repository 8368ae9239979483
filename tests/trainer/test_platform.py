"""The platform seam (``trainer.platform``): one place names devices and collective backends, chosen once."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.platform import CPU, CpuPlatform, CudaPlatform, PlatformUnavailable, choose_platform

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
# The only modules that may name a device or a collective backend: the platform itself, and the CPU compat
# layer (it patches megatron's literal ``device="cuda"`` allocations, so it must name them).
ALLOWED = {"platform.py", "backends/cpu_compat.py"}
LITERAL = re.compile(r"^(cpu|cuda|gloo|nccl)(:\d+)?$", re.IGNORECASE)


def device_names(source: str) -> list[tuple[int, str]]:
    """(line, what) for each string literal that is a device or backend name, and each use of ``torch.cuda``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and LITERAL.match(node.value):
            found.append((node.lineno, repr(node.value)))
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "cuda"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append((node.lineno, "torch.cuda"))
    return sorted(found)


def test_nothing_below_the_entry_point_names_a_device_or_backend():
    offenders = [
        f"trainer/{path.relative_to(TRAINER)}:{line}: {what}"
        for path in sorted(TRAINER.rglob("*.py"))
        if str(path.relative_to(TRAINER)) not in ALLOWED
        for line, what in device_names(path.read_text())
    ]
    assert not offenders, "ask the platform (trainer.platform) instead:\n" + "\n".join(offenders)


def test_the_scan_sees_each_kind_of_name():
    source = 'x.to("cuda:1")\ndist.init_process_group("gloo")\ntorch.cuda.is_available()\nb = "NCCL"\nok = "cpus"\n'
    assert [line for line, _ in device_names(source)] == [1, 2, 3, 4]


def test_auto_and_cpu_choose_the_cpu_platform_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_platform("auto") is CPU and choose_platform("cpu") is CPU
    assert isinstance(CPU, CpuPlatform) and CPU.collective_backend == "gloo"


def test_cuda_without_a_device_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PlatformUnavailable, match=r"run.device: cuda.*use run.device=auto or cpu"):
        choose_platform("cuda")


def test_cpu_platform_keeps_the_cpu_choices_of_megatron():
    fields = CPU.megatron_fields("bf16", moe=True)
    assert fields["use_cpu_initialization"] and fields["params_dtype"] == torch.bfloat16 and fields["bf16"]
    assert fields["moe_token_dispatcher_type"] == "allgather" and not fields["moe_grouped_gemm"]
    assert "moe_token_dispatcher_type" not in CPU.megatron_fields("fp32", moe=False)


def test_the_cuda_platform_installs_the_kernel_fallbacks_without_the_cpu_patches():
    """A bare GPU machine (no Transformer Engine, no flash-linear-attention: trainer.wheelhouse) builds MLA and the
    gated delta net, and routes MoE tokens, only through the torch twins; before they were part of every
    platform's install, only the CPU platform had them and the smoke's MLA and Qwen3-Next rows could not have built
    (then routed) there. Fresh interpreter: this one has the CPU patches installed already."""
    code = """
import torch
from megatron.core.ssm import gated_delta_net
from megatron.core.transformer import multi_latent_attention
from trainer.backends import cpu_compat
from trainer.models.specs import DuplicatedLinear
from trainer.platform import CudaPlatform

from megatron.core.transformer.moe import moe_utils

assert multi_latent_attention.HAVE_TE and not gated_delta_net.HAVE_FLA  # megatron's view before install
assert not hasattr(moe_utils, "te_general_gemm")  # the router's forward would raise NameError
CudaPlatform(0).install()
assert not multi_latent_attention.HAVE_TE and multi_latent_attention.TELinear is DuplicatedLinear
assert moe_utils.te_general_gemm is None
assert gated_delta_net.HAVE_FLA
assert gated_delta_net.chunk_gated_delta_rule is gated_delta_net.torch_chunk_gated_delta_rule
assert not cpu_compat.installed()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=TRAINER.parent, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize(("has_te", "precision", "expected"), [
    (True, "bf16", {"torch_attention": False}), (True, "fp32", {"torch_attention": True}),
    (False, "bf16", "TorchSpecProvider"), (False, "fp32", "TorchSpecProvider")])
def test_the_cuda_platform_keeps_te_attention_off_fp32_models(monkeypatch, has_te, precision, expected):
    """With TE, the CUDA platform builds TE's layers, but fp32 models keep the project's SDPA core attention: TE
    2.7 has no fp32 flash or fused attention and its unfused one refuses CP (the CP gates' tiny models are fp32).
    TE does not install here, so its provider is recorded, not built."""
    from trainer.models import specs

    monkeypatch.setattr(specs, "te_spec_provider", lambda **kwargs: kwargs)
    platform = CudaPlatform(0)
    platform.has_te = has_te
    provider = platform.spec_provider(precision)
    assert provider == expected if isinstance(expected, dict) else type(provider).__name__ == expected


def test_the_moe_router_gemm_falls_back_to_torch_without_te():
    """Without TE, megatron's router gating (every MoE layer, on every platform) must compute inp @ W.T + b."""
    from megatron.core.transformer.moe import moe_utils

    from trainer.models import kernel_fallbacks

    kernel_fallbacks.install()
    g = torch.Generator().manual_seed(0)
    inp, weight, bias = torch.randn(2, 3, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    out = moe_utils.RouterGatingLinearFunction.apply(inp, weight, bias, torch.float32)
    torch.testing.assert_close(out, inp @ weight.T + bias)


def test_without_a_compiler_megatrons_compiled_fusions_run_eager(tmp_path):
    """megatron wraps its fused elementwise ops in torch.compile, whose kernels need a compiler (inductor's C++ on
    CPU, Triton's C launcher on GPU) that a bare machine may lack: their first call fails. A platform that finds
    none runs them as the eager functions they wrap. Fresh interpreter whose PATH holds no compiler."""
    code = """
import torch
from megatron.core.fusions.fused_bias_swiglu import swiglu
from trainer.platform import CPU

y = torch.randn(4, 8)
eager = torch.nn.functional.silu(y[:, :4]) * y[:, 4:]
assert CPU.compiler() is None
try:
    swiglu(y)
except Exception as exc:
    print("compiled call failed:", type(exc).__name__)
CPU.install()
torch.testing.assert_close(swiglu(y), eager)
print("eager:", CPU.describe()["compiler"])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")} | {"PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=TRAINER.parent, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "compiled call failed: InductorError", "eager: no compiler: torch.compile runs eager"], out.stdout


def test_the_platforms_find_their_compilers_as_torch_does(monkeypatch, tmp_path):
    assert CPU.compiler()  # this machine builds inductor's kernels (CI's too)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert CudaPlatform(0).compiler() is None
    monkeypatch.setenv("CC", "/opt/cc")
    assert CudaPlatform(0).compiler() == "/opt/cc"


def test_engine_replicas_get_slices_of_the_processs_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    platform = CudaPlatform(0)
    assert [platform.engine_environment(i, 2) for i in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    with pytest.raises(PlatformUnavailable, match="rollout engine 2 needs GPUs 4..5 of this process, which sees 4"):
        platform.engine_environment(2, 2)
    assert CPU.engine_environment(1, 2) == {}  # processes on the host


def test_a_compiler_without_pythons_headers_compiles_nothing(monkeypatch):
    """Triton builds each kernel's launcher against Python.h: a compiler alone is not enough (apt's python3.12
    without -dev)."""
    from trainer import platform as platform_module

    assert platform_module.python_headers()  # this machine (and CI) has them
    assert CPU.compile_blocker() is None
    monkeypatch.setattr(platform_module, "python_headers", lambda: False)
    assert CPU.compile_blocker() == f"{CPU.compiler()} without Python.h: torch.compile runs eager"
    assert CPU.describe()["compiler"] == CPU.compile_blocker()
