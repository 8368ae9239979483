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


class TorchNorm:
    """torch's RMSNorm / LayerNorm behind megatron's norm constructor, sequence parallelism included.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism; with it, a norm sees only this TP rank's part
    of the sequence, so its weight is marked ``sequence_parallel`` and its gradient is summed over TP
    (``trainer.parallel.dp.sum_tp_partial_grads``), as megatron does for its fused norms.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred norm weights are not supported by the torch norm")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
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
