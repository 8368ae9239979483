"""The project's core attention: torch scaled_dot_product_attention behind megatron-core's contract.

It fills the ``core_attention`` slot of ``SelfAttentionSubmodules`` (and, later, of MLA's submodules),
so it honours ``CoreAttentionBuilder`` (keyword-only constructor) and ``CoreAttention.forward`` from
``megatron/core/transformer/attention.py``:

    query [sq, b, np, hk]   key [sk, b, ng, hk]   value [sk, b, ng, hv]   →   context [sq, b, np·hv]

with np attention heads and ng query groups on this tensor-parallel rank. The q/k head dim ``hk`` and
the v head dim ``hv`` may differ (MLA: hk = nope + rope dims, hv = v_head_dim); they are read from the
tensors, so one module serves GQA and MLA. Unlike megatron's local ``DotProductAttention`` it accepts
MLA's ``k_channels`` / ``v_channels`` and runs context parallelism (``trainer.parallel.cp``).
"""

from __future__ import annotations

import contextlib
import math

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from trainer.parallel import cp


class SDPACoreAttention(MegatronModule):
    """Causal (or mask-driven) attention with grouped-query heads, computed by torch SDPA."""

    def __init__(
        self,
        *,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection=None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        attention_dropout: float | None = None,
    ):
        super().__init__(config=config)
        if config.apply_query_key_layer_scaling:
            raise ValueError(
                "apply_query_key_layer_scaling is not supported by SDPACoreAttention (fp16 only)"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        self.k_channels = k_channels if k_channels is not None else config.kv_channels
        self.v_channels = v_channels if v_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_size = config.context_parallel_size
        # megatron's MLA / Muon code reads this attribute after forward when qk-clip is on; we never track it.
        self.current_max_attn_logits = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        /,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        """Attention over [s, b, heads, dim] tensors; returns [sq, b, np·hv].

        ``attention_mask``: None (causal from ``attn_mask_type``) or megatron's boolean mask broadcastable
        to [b, np, sq, sk] where True means "masked out".
        """
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences (thd) are not supported by SDPACoreAttention yet")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type

        cp_mask = None
        if self.cp_size > 1:
            # Load-balanced CP: keys/values of every CP rank, and a causal mask from true positions.
            if attention_mask is not None:
                raise NotImplementedError("context parallelism with an explicit attention mask")
            key, value, cp_mask = cp.gather_kv_causal(key, value)

        sq, b, np_, _ = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = np_ // k.shape[1]
        if groups > 1:
            # GQA: each kv head serves `groups` consecutive query heads (megatron's head order).
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)

        if cp_mask is not None:
            mask, is_causal = cp_mask, False
        elif attention_mask is not None:
            mask, is_causal = ~attention_mask, False
        else:
            mask, is_causal = None, mask_type == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0
        # Attention dropout draws from the tensor-parallel RNG stream, as megatron's DotProductAttention.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.softmax_scale
            )  # [b, np, sq, hv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * v.shape[-1])
