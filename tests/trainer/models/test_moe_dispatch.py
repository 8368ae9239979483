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

With TE the CUDA platform also takes grouped-GEMM experts, whose weights TE names otherwise; the last test checks
that every expert weight's TE name comes back to the name the weight maps know.
"""

import re

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


@pytest.mark.parametrize("name", ["tiny-moonlight", "tiny-qwen3-next"])
def test_te_grouped_expert_names_are_the_sequential_experts_names(matrix, groups, name):
    """With TE, the CUDA platform's grouped-GEMM experts (``TEGroupedMLP``) name local expert e's weights
    ``experts.linear_fc1.weight{e}``; the weight maps, the sharded files and the EP renumbering know
    ``experts.local_experts.{e}.linear_fc1.weight`` (what this CPU model has). ``gather.canonical_name`` maps
    one onto the other and leaves every other name alone."""
    from trainer.parallel.gather import canonical_name, global_name

    gpt = build_gpt_model(matrix.models[name], seed=0)
    names = [n for n, _ in gpt.named_parameters()]
    assert [canonical_name(n) for n in names] == names
    sequential = re.compile(r"\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
    experts = [n for n in names if sequential.search(n)]
    assert len(experts) == 2 * matrix.models[name].shape.moe.experts * sum(".experts.local_experts.0.linear_fc1." in n
                                                                           for n in names)
    for n in experts:
        te = sequential.sub(lambda m: f".experts.{m.group(2)}.weight{m.group(1)}", n)
        assert te != n and canonical_name(te) == n and global_name(te, gpt) == global_name(n, gpt)


def test_a_te_grouped_swiglu_fc1_is_gathered_as_gate_and_up_slices():
    """On each expert-TP rank a grouped expert's SwiGLU fc1 holds [gate_r; up_r], as SequentialMLP's does, but TE
    marks it stride 1: ``mark_tp_groups`` gives it SequentialMLP's stride 2 (fc2 keeps its own), so the gather
    interleaves gate and up slices back into [gate; up]. A module tree with TE's names and marks stands in for
    TE's ``GroupedLinear``, which does not install here."""
    from types import SimpleNamespace

    from trainer.parallel.gather import _local_sections, mark_tp_groups

    def grouped(rows: int, dim: int) -> torch.nn.Module:
        linear = torch.nn.Module()
        for e in range(2):
            weight = torch.nn.Parameter(torch.zeros(rows, 8))
            weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, 1
            linear.register_parameter(f"weight{e}", weight)
        return linear

    experts = torch.nn.Module()
    experts.linear_fc1, experts.linear_fc2 = grouped(12, 0), grouped(8, 1)
    model = torch.nn.Module()  # parameters named mlp.experts.linear_fc{1,2}.weight{e}
    model.mlp = torch.nn.Module()
    model.mlp.experts, model.config = experts, SimpleNamespace(gated_linear_unit=True)
    mark_tp_groups(model)
    assert [_local_sections(experts.linear_fc1.get_parameter(f"weight{e}"), 2) for e in range(2)] == [[6, 6]] * 2
    assert [experts.linear_fc2.get_parameter(f"weight{e}").partition_stride for e in range(2)] == [1, 1]
