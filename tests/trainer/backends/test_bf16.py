"""precision: bf16 on CPU. One training step with bf16 parameters (fp32 main parameters on megatron, FSDP2's
bf16 compute over fp32 shards) moves the weights as the fp32 step does, within bf16's resolution.

Why the tolerance: Adam's first step moves each element by lr·g/(|g| + eps) = ±lr (lr = 1e-3 here) wherever the
gradient is not tiny, so the fp32 and bf16 updates differ where bf16's ~3 significant digits flip the sign of a
near-zero gradient element, and by the rounding of the updated bf16 weight (half an ulp: 2^-9·|w|, a tenth of
lr for |w| ≈ 0.05). Measured on CPU (tiny models, seed 0): ‖Δbf16 − Δfp32‖ / ‖Δfp32‖ = 0.092–0.097, cosine ≥ 0.995 (dense,
MLA+MoE, FSDP2).
The test allows 0.3 and a cosine of at least 0.95; an update that never reaches the bf16 weights (main copies
not written back) gives a relative difference of 1.
"""

import pytest
import torch

from matrix.schema import Layout
from trainer.backends.base import build_backend
from trainer.backends.optim import MainParamsAdamW
from trainer.parallel.process_groups import process_groups
from trainer.worker import one_process

FAULT = False
RECIPES = {"dense": "tiny-qwen2.5", "mla-moe": "tiny-moonlight", "fsdp2": "tiny-qwen3-fsdp"}


def batch(seed=0, b=8, t=16, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "response_mask": mask[:, 1:].float()}


def nll(tokens):
    def loss_fn(logp, entropy, mb):
        m = mb["response_mask"]
        return -torch.where(m.bool(), logp, 0).sum() / tokens, {}

    return loss_fn


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


def step_update(resolved, precision: str, initial: dict) -> dict[str, torch.Tensor]:
    """The model's weights after one step minus before, as fp32, by parameter name; both precisions start from
    ``initial``. Under megatron's bf16 these are the bf16 parameters the next forward (and the engine) sees, set
    from the fp32 main copies (checked exactly); FSDP2's sharded parameters stay fp32 themselves."""
    r = resolved.model_copy(update={"recipe": resolved.recipe.model_copy(update={"precision": precision})})
    with process_groups(Layout(fsdp=r.layout.fsdp)):
        be = build_backend(r, seed=0, initial=initial)
        before = {n: _whole(p) for n, p in be.model.named_parameters()}
        be.train_step(batch(), nll, micro_batch_size=4)
        if isinstance(be.optimizer, MainParamsAdamW):
            assert FAULT or all(torch.equal(p, main.to(p.dtype)) for p, main in be.optimizer.pairs)
        return {n: _whole(p) - before[n] for n, p in be.model.named_parameters()}


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f == "mla-moe" else f for f in RECIPES]
)  # MLA+MoE: ~27 s on the shared CI-sized machine
def test_one_bf16_step_moves_the_weights_as_the_fp32_step(matrix, family):
    resolved = one_process(matrix.resolve(RECIPES[family]))
    with process_groups(Layout(fsdp=resolved.layout.fsdp)):
        initial = dict(build_backend(resolved, seed=0, trainable=False).hf_named_tensors())
    # bf16 parameters hold the initial weights rounded: both runs start from exactly those values
    initial = {k: v.to(torch.bfloat16).float() for k, v in initial.items()}
    fp32, bf16 = step_update(resolved, "fp32", initial), step_update(resolved, "bf16", initial)
    a = torch.cat([fp32[k].flatten() for k in fp32])
    b = torch.cat([bf16[k].flatten() for k in fp32])
    rel = float((b - a).norm() / a.norm())
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert a.norm() > 0 and rel < 0.3 and cosine > 0.95, (family, rel, cosine)
