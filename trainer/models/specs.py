"""The backend provider every family's layer specs are built through (``trainer.models.families``).

``CpuSpecProvider`` is megatron's ``LocalSpecProvider`` with two fields swapped: our SDPA core attention
(GQA, q/k vs v head dims, a CP hook) and torch norms chosen without rewriting megatron's module-level
``LNImpl`` global. GPU providers (TE) will sit beside it; the spec functions only ask the provider.

The local provider does not fuse norms into linears, so every norm is its own parameter; the family
modules' weight rules follow exactly these names.
"""

from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from trainer.models.attention import SDPACoreAttention


class CpuSpecProvider(LocalSpecProvider):
    """Megatron-core local modules, with the project's core attention and torch norms."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        # WrappedTorchNorm reads config.normalization (RMSNorm here); no global is touched.
        return WrappedTorchNorm

    def core_attention(self) -> type:
        return SDPACoreAttention
