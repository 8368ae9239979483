"""The backend provider every family's layer specs are built through (``trainer.models.families``).

``CpuSpecProvider`` is megatron's ``LocalSpecProvider`` with two fields swapped: our SDPA core attention
(GQA, q/k vs v head dims, a CP hook) and torch norms chosen without rewriting megatron's module-level
``LNImpl`` global. GPU providers (TE) will sit beside it; the spec functions only ask the provider.

The local provider does not fuse norms into linears, so every norm is its own parameter; the family
modules' weight rules follow exactly these names.
"""

from __future__ import annotations

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.transformer_config import TransformerConfig

from trainer.models.attention import SDPACoreAttention


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm whose scale is ``1 + weight`` (weight initialised to 0), computed in fp32 then cast back:
    megatron's ``layernorm_zero_centered_gamma`` for RMSNorm, as transformers' Qwen3-Next norm computes it."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class TorchNorm:
    """torch's RMSNorm / LayerNorm behind megatron's norm constructor, sequence parallelism included.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism; with it, a norm sees only this TP rank's part
    of the sequence, so its weight is marked ``sequence_parallel`` and its gradient is summed over TP
    (``trainer.parallel.dp.sum_tp_partial_grads``), as megatron does for its fused norms.

    Zero-centred weights follow ``config.layernorm_zero_centered_gamma`` (RMSNorm only) unless a spec passes
    ``zero_centered_gamma=False`` for a norm that keeps a plain weight in a zero-centred model.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool | None = None, normalization: str = "LayerNorm"):
        zero_centered = config.layernorm_zero_centered_gamma if zero_centered_gamma is None else zero_centered_gamma
        if zero_centered and config.normalization != "RMSNorm":
            raise ValueError("zero-centred norm weights are supported for RMSNorm only by the torch norm")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if zero_centered:
            norm = ZeroCenteredRMSNorm(hidden_size, eps)
        else:
            norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class CpuSpecProvider(LocalSpecProvider):
    """Megatron-core local modules, with the project's core attention and torch norms."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        # TorchNorm reads config.normalization (RMSNorm here); megatron's LNImpl global is never touched.
        return TorchNorm

    def core_attention(self) -> type:
        return SDPACoreAttention
