"""The backend provider every family's layer specs are built through (``trainer.models.families``).

``TorchSpecProvider`` is megatron's ``LocalSpecProvider`` with two fields swapped: our SDPA core attention
(GQA, q/k vs v head dims, a CP hook) and torch norms chosen without rewriting megatron's module-level
``LNImpl`` global. The platform (``trainer.platform``) hands a provider to the families: this one on CPU (and on
a GPU without Transformer Engine), megatron's ``TESpecProvider`` on a GPU with it (``te_spec_provider``: with this
core attention for fp32 models); the spec functions only ask the provider.

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


class DuplicatedLinear(torch.nn.Module):
    """A linear layer whose whole weight every TP rank holds: TE's ``TELinear(parallel_mode="duplicated")``
    in torch, for MLA's q/kv down projections.

    megatron-core's MLA takes its duplicated-projection path only for ``TELinear`` (``kernel_fallbacks`` points that
    name here when TE is absent). It is the path whose gradients are right under TP: the rope key leaves
    through ``gather_from_sequence_parallel_region``, whose backward sums the heads' partial gradients over TP,
    while the column-parallel path hands each TP rank its own heads' part only. With sequence parallelism each
    rank sees a part of the sequence, so the weight is marked ``sequence_parallel`` and its gradient is summed
    over TP (``trainer.parallel.dp.sum_tp_partial_grads``). Without sequence parallelism a TP rank's rope-key
    gradient would still be its heads' part only; MLA comes with MoE here, and MoE with TP > 1 requires sequence
    parallelism (``ParallelLayout.model_problems``).
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, init_method, bias: bool,
                 skip_bias_add: bool, parallel_mode: str | None = None, **_unused):
        super().__init__()
        if bias:
            raise ValueError("MLA's down projections have no bias")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        if config.perform_initialization:
            init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel
        self.weight.tensor_model_parallel = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(x, self.weight), None


class TorchSpecProvider(LocalSpecProvider):
    """Megatron-core local modules, with the project's core attention and torch norms."""

    def linear(self) -> type:
        return DuplicatedLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        # TorchNorm reads config.normalization (RMSNorm here); megatron's LNImpl global is never touched.
        return TorchNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


def te_spec_provider(*, torch_attention: bool):
    """megatron's ``TESpecProvider`` (Transformer Engine's layers; imported here, on a GPU with TE only), with the
    project's SDPA core attention where ``torch_attention``: TE 2.7 has no fp32 flash or fused attention, and its
    unfused fallback refuses context parallelism ("No dot product attention backend is available"), so an fp32
    model with CP > 1 would not run on TE's attention. (GPU) not verified here."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    if not torch_attention:
        return TESpecProvider()

    class TESpecProviderWithTorchAttention(TESpecProvider):
        def core_attention(self) -> type:
            return SDPACoreAttention

    return TESpecProviderWithTorchAttention()
