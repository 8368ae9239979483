"""SDPACoreAttention against a written-out softmax(QKᵀ/√d)V with GQA and q/k vs v head dims that differ."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from trainer.models.attention import SDPACoreAttention


def config(cp=1):
    return TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        use_cpu_initialization=True,
        context_parallel_size=cp,
        attention_dropout=0.0,
    )


def reference(q, k, v, scale):
    """[s, b, h, d] inputs, loops over heads; head j uses kv group j // (heads / groups)."""
    s, b, nh, _ = q.shape
    rep = nh // k.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    out = []
    for j in range(nh):
        qj, kj, vj = (
            q[:, :, j].transpose(0, 1),
            k[:, :, j // rep].transpose(0, 1),
            v[:, :, j // rep].transpose(0, 1),
        )
        scores = (qj @ kj.transpose(1, 2) * scale).masked_fill(~causal, float("-inf"))
        out.append(torch.softmax(scores, -1) @ vj)  # [b, s, dv]
    return torch.stack(out, 2).transpose(0, 1).reshape(s, b, -1)


@pytest.mark.parametrize("dk,dv", [(8, 8), (12, 6)])
def test_matches_reference_gqa(dk, dv):
    torch.manual_seed(0)
    attn = SDPACoreAttention(
        config=config(), layer_number=1, attn_mask_type=AttnMaskType.causal, k_channels=dk, v_channels=dv
    )
    q, k, v = torch.randn(5, 3, 4, dk), torch.randn(5, 3, 2, dk), torch.randn(5, 3, 2, dv)
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=None)
    assert out.shape == (5, 3, 4 * dv)
    torch.testing.assert_close(out, reference(q, k, v, 1 / math.sqrt(dk)), rtol=1e-5, atol=1e-5)


def test_explicit_mask_is_megatron_convention():
    """True in megatron's mask means 'masked out'; a causal boolean mask equals the causal path."""
    attn = SDPACoreAttention(config=config(), layer_number=1, attn_mask_type=AttnMaskType.causal)
    q, k, v = torch.randn(6, 2, 4, 8), torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)[None, None]
    torch.testing.assert_close(attn(q, k, v, mask), attn(q, k, v, None))
