"""The DeepSeek-V3 family under expert parallelism 2 and tensor parallelism 2 (two gloo processes, allgather
dispatcher, the project's core attention): each rank holds its shard of the weights, and the logits still equal
transformers' on the same tokens."""

import re

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from matrix import load_matrix
from matrix.schema import Layout
from trainer.models.config import hf_config
from trainer.models.weight_map import mcore_to_hf
from trainer.parallel.process_groups import free_port

EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def shard(name, full, param, rank, size):
    """This rank's piece of a full tensor, as megatron's parameter attributes say it is split.

    SwiGLU fc1 holds [gate; up]; a TP shard of it is [gate_r; up_r]."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0)
    return full.chunk(size, dim)[rank]


def _rank(rank, layout, full, ids, result_path):
    from megatron.core import parallel_state as ps

    from trainer.models.build import build_gpt_model
    from trainer.parallel.process_groups import destroy_process_groups, init_process_groups

    torch.set_num_threads(1)
    model = load_matrix().models["tiny-moonlight"]
    init_process_groups(layout, rank=rank, world_size=2)
    try:
        gpt = build_gpt_model(model, seed=0, layout=layout).eval()
        per_rank = model.shape.moe.experts // layout.ep
        ep_rank, tp_rank = ps.get_expert_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        etp_rank = ps.get_expert_tensor_parallel_rank()
        with torch.no_grad():
            for name, t in gpt.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                m = EXPERT.match(name)
                glob = f"{m.group(1)}{ep_rank * per_rank + int(m.group(2))}{m.group(3)}" if m else name
                param = dict(gpt.named_parameters()).get(name)
                r, size = (etp_rank, layout.expert_tp) if m else (tp_rank, layout.tp)
                t.copy_(shard(name, full[glob], param, r, size) if param is not None else full[glob])
            logits = gpt(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        torch.save(logits, f"{result_path}.{rank}")
    finally:
        destroy_process_groups()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(ep=2), Layout(tp=2)], ids=["ep2", "tp2"])
def test_parallel_logits_equal_transformers(matrix, groups, randomize, tmp_path, monkeypatch, layout):
    from trainer.models.build import build_gpt_model

    model = matrix.models["tiny-moonlight"]
    gpt = randomize(build_gpt_model(model, seed=0).eval(), 1)
    full = {k: v.detach().clone() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    hf_model = AutoModelForCausalLM.from_config(hf_config(model), attn_implementation="sdpa").eval()
    hf_model.load_state_dict(mcore_to_hf(full, model), strict=True)
    ids = torch.randint(0, model.shape.vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_model(ids).logits
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    # a failing rank raises here and the other is terminated (torch.multiprocessing joins both)
    mp.start_processes(_rank, args=(layout, full, ids, str(tmp_path / "logits")), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        ours = torch.load(tmp_path / f"logits.{rank}")
        # vocab-parallel logits (parallel_output=True under TP) hold this rank's slice of the vocabulary
        theirs_r = theirs.chunk(2, dim=-1)[rank] if ours.shape[-1] != theirs.shape[-1] else theirs
        diff = (ours - theirs_r).abs().max().item()
        print(f"deepseek_v3 {layout.model_dump(exclude_defaults=True)} rank {rank}: max |logit diff| = {diff:.2e}")
        assert diff < 1e-4
