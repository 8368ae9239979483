"""run.full_recompute / run.selective_recompute: megatron's activation recomputation, same outputs and gradients
on CPU (bit for bit: recomputation replays the same operations)."""

import pytest
import torch

from trainer.models.build import build_gpt_model


@pytest.mark.parametrize(
    "name,recompute",
    [("tiny-qwen2.5", "full"), ("tiny-qwen2.5", "selective"), ("tiny-moonlight", "selective")],
)
def test_recompute_gives_the_same_gradients(matrix, groups, name, recompute):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10).expand(2, 10)
    grads, outputs = [], []
    for mode in ("none", recompute):
        gpt = build_gpt_model(matrix.models[name], seed=0, recompute=mode)
        assert gpt.config.recompute_granularity == (None if mode == "none" else mode)
        gpt.train()
        out = gpt(ids, pos, None)
        out.float().square().mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in gpt.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=0, atol=0)
