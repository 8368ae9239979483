"""Layer specs of the dense GQA family (Qwen2 / Qwen3), built through one backend provider.

``CpuSpecProvider`` is megatron's ``LocalSpecProvider`` with two fields swapped: our SDPA core attention
(GQA, q/k vs v head dims, a CP hook) and torch norms chosen without rewriting megatron's module-level
``LNImpl`` global. GPU providers (TE) will sit beside it; the spec function only asks the provider.

The local provider does not fuse norms into linears, so the layer's parameters are
``input_layernorm.weight``, ``self_attention.linear_qkv.{weight,bias}``,
``self_attention.{q,k}_layernorm.weight`` (Qwen3), ``self_attention.linear_proj.weight``,
``pre_mlp_layernorm.weight``, ``mlp.linear_fc1.weight`` ([gate; up]) and ``mlp.linear_fc2.weight``;
``weight_map.py`` follows exactly these names.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from trainer.models.attention import SDPACoreAttention


class CpuSpecProvider(LocalSpecProvider):
    """Megatron-core local modules, with the project's core attention and torch norms."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        # WrappedTorchNorm reads config.normalization (RMSNorm here); no global is touched.
        return WrappedTorchNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


def dense_layer_spec(*, qk_norm: bool, backend: LocalSpecProvider | None = None) -> ModuleSpec:
    """One pre-norm transformer layer: RMSNorm → GQA self-attention (rope) → RMSNorm → SwiGLU MLP.

    ``qk_norm`` adds per-head RMSNorm on q and k after the projection (Qwen3). QKV bias (Qwen2) is a
    config switch (``add_qkv_bias``), not a spec change.
    """
    backend = backend or CpuSpecProvider()
    norm = backend.layer_norm(rms_norm=True)
    qk = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )
