"""The Qwen3-Next family under expert parallelism 2 and tensor parallelism 2 with sequence parallelism (two gloo
processes): each rank loads its shard through the trainer's own ``local_tensors`` (delta-net in_proj / conv1d
sections split per rank), and the logits still equal transformers' on the same tokens (tolerance: see
test_qwen3_next.py)."""

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from matrix import load_matrix
from matrix.schema import Layout
from trainer.models.config import hf_config
from trainer.models.weight_map import mcore_to_hf
from trainer.parallel.process_groups import free_port

TOLERANCE = 1e-3


def _rank(rank, layout, full, ids, result_path):
    from trainer.models.build import build_gpt_model
    from trainer.parallel.gather import local_tensors
    from trainer.parallel.process_groups import destroy_process_groups, init_process_groups

    torch.set_num_threads(1)
    model = load_matrix().models["tiny-qwen3-next"]
    init_process_groups(layout, rank=rank, world_size=2)
    try:
        gpt = build_gpt_model(model, seed=0, layout=layout).eval()
        with torch.no_grad():
            for param, piece in local_tensors(gpt, full):
                param.copy_(piece)
            logits = gpt(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        torch.save(logits, f"{result_path}.{rank}")
    finally:
        destroy_process_groups()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [Layout(ep=2), Layout(tp=2, sequence_parallel=True)], ids=["ep2", "tp2-sp"])
def test_parallel_logits_equal_transformers(matrix, groups, randomize, tmp_path, monkeypatch, layout):
    from trainer.models.build import build_gpt_model

    model = matrix.models["tiny-qwen3-next"]
    gpt = randomize(build_gpt_model(model, seed=0).eval(), 1)
    full = {k: v.detach().clone() for k, v in gpt.named_parameters()}
    hf_model = AutoModelForCausalLM.from_config(hf_config(model), attn_implementation="sdpa").eval()
    hf_model.load_state_dict(mcore_to_hf(full, model), strict=True)
    ids = torch.randint(0, model.shape.vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_model(ids).logits
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    mp.start_processes(_rank, args=(layout, full, ids, str(tmp_path / "logits")), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        ours = torch.load(tmp_path / f"logits.{rank}")
        # vocab-parallel logits (parallel_output=True under TP) hold this rank's slice of the vocabulary
        theirs_r = theirs.chunk(2, dim=-1)[rank] if ours.shape[-1] != theirs.shape[-1] else theirs
        diff = (ours - theirs_r).abs().max().item()
        print(f"qwen3_next {layout.model_dump(exclude_defaults=True)} rank {rank}: max |logit diff| = {diff:.2e}")
        assert diff < TOLERANCE
