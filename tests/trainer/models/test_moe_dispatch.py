"""The GPU platform's MoE dispatch, run on one CPU rank: megatron's alltoall token dispatcher (the seeds' choice,
which CudaPlatform sets) gives the logits and gradients of the allgather dispatcher that the CPU platform uses.

gloo has no uneven all_to_all, so alltoall cannot run with EP > 1 here; on one rank it runs the whole dispatcher
(permutation by expert, the per-rank split bookkeeping, un-permutation with the routing probabilities), which is
what the one-GPU smoke's MLA+MoE and Qwen3-Next rows run on a GPU. The two dispatchers order tokens differently
before the expert GEMMs and may sum the top-k outputs back in another order, so the test allows fp32 rounding
(1e-4 on logits whose largest is 7.0 for tiny-moonlight and 7.8 for tiny-qwen3-next; relative 1e-4 on gradients)
although on this machine they are equal bit for bit (measured: 0 on logits and on every gradient, both families).
Routing probabilities reversed across experts inside the alltoall dispatcher (a planted fault, run by hand) moved
the logits by 6.6 and 9.6.
"""

import pytest
import torch

from trainer.models.build import build_gpt_model
from trainer.platform import CpuPlatform, CudaPlatform

TOLERANCE = 1e-4


class CpuWithGpuDispatch(CpuPlatform):
    """The CPU platform with the CUDA platform's MoE fields (on a GPU without Transformer Engine: no grouped GEMM)."""

    def moe_fields(self) -> dict:
        gpu = CudaPlatform(0)  # a torch.device only: nothing touches CUDA
        gpu.has_te = False
        return gpu.moe_fields()


def logits_and_grads(model, platform, randomize):
    gpt = randomize(build_gpt_model(model, seed=0, platform=platform), 1)
    ids = torch.randint(0, model.shape.vocab, (3, 24), generator=torch.Generator().manual_seed(2))
    logits = gpt(ids, torch.arange(24).expand(3, 24), None)
    (logits.float().square().mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in gpt.named_parameters() if p.grad is not None}
    return logits.detach(), grads, gpt.config


@pytest.mark.parametrize("name", ["tiny-moonlight", "tiny-qwen3-next"])
def test_alltoall_dispatch_equals_allgather_on_one_rank(matrix, groups, randomize, name):
    model = matrix.models[name]
    ours, our_grads, config = logits_and_grads(model, CpuWithGpuDispatch(), randomize)
    assert config.moe_token_dispatcher_type == "alltoall" and not config.moe_grouped_gemm
    theirs, their_grads, config = logits_and_grads(model, CpuPlatform(), randomize)
    assert config.moe_token_dispatcher_type == "allgather"

    assert ours.abs().max() > 1.0
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit diff| alltoall vs allgather = {diff:.2e}")
    assert diff < TOLERANCE
    assert our_grads.keys() == their_grads.keys() and any("experts" in n for n in our_grads)
    relative = {n: (our_grads[n] - g).abs().max().item() / (g.abs().max().item() or 1.0)
                for n, g in their_grads.items()}
    print(f"{name}: max relative gradient diff = {max(relative.values()):.2e}, "
          f"max |logit| = {theirs.abs().max().item():.2f}")
    assert all(r <= TOLERANCE for r in relative.values()), relative
