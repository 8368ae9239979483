"""Numerical check of a conversion: the same fixed tokens through transformers and through megatron-core.

Both models run in fp32 whatever the checkpoint dtype, so the difference measures the conversion and the
two implementations' operation order, not bf16 rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from matrix.schema import Layout
from trainer.convert import ConvertError
from trainer.models.weight_files import MCORE_INDEX, iter_shard, read_mcore_model, shards_in_order, weight_map

# fp32 logits of O(1–10) through tens of layers of two differently ordered implementations differ by
# ~1e-6 per layer; a wrong tensor or routing moves them by O(0.1–1).
DEFAULT_TOLERANCE = 1e-3


def fixed_tokens(vocab: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))


def max_logit_difference(hf_dir: Path, mcore_dir: Path, *, seq_len: int = 32) -> float:
    from transformers import AutoModelForCausalLM

    from trainer.models.build import build_gpt_model
    from trainer.parallel.process_groups import process_groups

    model, meta = read_mcore_model(mcore_dir)
    if "degrees" in meta:
        raise ConvertError(f"{mcore_dir}: sharded for layout {meta.get('layout')}; verify reads the unsharded form: "
                           f"convert with --layout single and verify that")
    model = model.model_copy(update={"dtype": "fp32"})
    mcore_map = weight_map(mcore_dir, index=MCORE_INDEX, single=None)
    seq_len = min(seq_len, model.shape.max_position)
    ids = fixed_tokens(model.shape.vocab, seq_len)
    with process_groups(Layout()):
        gpt = build_gpt_model(model, seed=0).eval()
        state = gpt.state_dict()
        with torch.no_grad():
            for shard in tqdm(shards_in_order(mcore_map), desc="load mcore", unit="shard"):
                for name, tensor in iter_shard(mcore_dir, shard):
                    if name not in state or state[name].shape != tensor.shape:
                        raise ConvertError(f"{mcore_dir}: tensor {name!r} does not fit the model it describes")
                    state[name].copy_(tensor.float())
        unset = sorted(k for k in state if not k.endswith("_extra_state") and k not in mcore_map)
        if unset:
            raise ConvertError(f"{mcore_dir}: no tensor for {unset[0]!r}")
        with torch.no_grad():
            ours = gpt(ids, torch.arange(seq_len).expand_as(ids), None).float()
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        theirs = hf_model(ids).logits.float()
    return float((ours - theirs).abs().max())
