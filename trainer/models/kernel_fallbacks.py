"""Torch twins for the GPU kernel libraries a machine may lack: Transformer Engine (MLA's down projections, the MoE
router's GEMM) and flash-linear-attention (Qwen3-Next's gated delta rule), patched into megatron-core 0.16.1's
modules in memory.

Every platform installs these (``Platform.install``): a CPU machine has neither library, and neither has a bare
GPU machine (``trainer.wheelhouse``: torch and megatron-core only), where megatron would otherwise fail to build
MLA (``isinstance`` against a MagicMock) or refuse to build the gated delta net. Where the library imports,
nothing is patched and megatron uses its kernels. ``install()`` is idempotent.
"""

from __future__ import annotations

import importlib.util

import torch


def _patch_mla_without_te() -> None:
    """Without Transformer Engine, megatron's TE extension module exports MagicMock stand-ins, so MLA's
    ``HAVE_TE`` is still True and its ``isinstance(linear_proj, TELinear)`` check raises: set the flag to what it
    means. MLA also recognises a duplicated (whole-weight) down projection only as ``TELinear``; the torch twin
    (``trainer.models.specs.DuplicatedLinear``) takes that name, so the model runs the MLA branch a TE build
    runs (DuplicatedLinear says why the column-parallel branch gets the rope-key gradient wrong under TP)."""
    from megatron.core.transformer import multi_latent_attention

    from trainer.models.specs import DuplicatedLinear

    if importlib.util.find_spec("transformer_engine") is None:
        multi_latent_attention.HAVE_TE = False
        multi_latent_attention.TELinear = DuplicatedLinear


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """flash-linear-attention's ``l2norm`` in torch: x / sqrt(sum(x²) + eps) over ``dim``."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def has_gated_delta_net() -> bool:
    """megatron-core ships the gated delta net from 0.16 on; with an older release its patches are no-ops."""
    return importlib.util.find_spec("megatron.core.ssm.gated_delta_net") is not None


def _patch_gated_delta_net() -> None:
    if not has_gated_delta_net():
        return
    from megatron.core.ssm import gated_delta_net

    # The layer refuses to build without flash-linear-attention (Triton kernels). Its two FLA entry points
    # get torch twins: the l2 norm, and the chunked gated delta rule megatron itself ships for
    # deterministic mode (same signature). The causal conv already falls back to torch's conv1d.
    if not gated_delta_net.HAVE_FLA:
        gated_delta_net.l2norm = l2norm
        gated_delta_net.chunk_gated_delta_rule = gated_delta_net.torch_chunk_gated_delta_rule
        gated_delta_net.HAVE_FLA = True


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1 defines ``moe_utils.te_general_gemm`` only when Transformer Engine imports, yet its
    router asks ``te_general_gemm is not None`` on every forward: a NameError without TE, on any device. None
    is what the check means there (torch matmuls)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install() -> None:
    _patch_mla_without_te()
    _patch_gated_delta_net()
    _patch_moe_router_without_te()
