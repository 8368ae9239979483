"""The MoE families under expert parallelism 2 and tensor parallelism 2 (two gloo processes): each rank takes its
shard of the whole weights through the trainer's own ``local_tensors`` (what multi-process runs load), and the
logits still equal transformers' on the same tokens, within each family's tolerance (test_deepseek_v3.py,
test_qwen3_next.py say why)."""

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from matrix import load_matrix
from matrix.schema import Layout
from trainer.models.config import hf_config
from trainer.models.weight_map import mcore_to_hf
from trainer.parallel.process_groups import free_port

CASES = [  # (tiny model, layout, tolerance)
    ("tiny-moonlight", Layout(ep=2), 1e-4),
    ("tiny-moonlight", Layout(tp=2), 1e-4),
    ("tiny-qwen3-next", Layout(ep=2), 1e-3),
    ("tiny-qwen3-next", Layout(tp=2, sequence_parallel=True), 1e-3),
]


def _rank(rank, model_name, layout, full, ids, result_path):
    from trainer.models.build import build_gpt_model
    from trainer.parallel.gather import global_name, local_tensors
    from trainer.parallel.process_groups import destroy_process_groups, init_process_groups

    torch.set_num_threads(1)
    model = load_matrix().models[model_name]
    init_process_groups(layout, rank=rank, world_size=2)
    try:
        gpt = build_gpt_model(model, seed=0, layout=layout).eval()
        with torch.no_grad():
            for param, piece in local_tensors(gpt, full):
                param.copy_(piece)
            for name, buffer in gpt.named_buffers():  # replicated (the router's expert bias)
                if global_name(name, gpt) in full:
                    buffer.copy_(full[global_name(name, gpt)])
            logits = gpt(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        torch.save(logits, f"{result_path}.{rank}")
    finally:
        destroy_process_groups()


@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "layout", "tolerance"), CASES,
                         ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in lay.model_dump(exclude_defaults=True).items())}"
                              for m, lay, _ in CASES])
def test_parallel_logits_equal_transformers(matrix, groups, randomize, tmp_path, monkeypatch, model_name, layout,
                                            tolerance):
    from trainer.models.build import build_gpt_model

    model = matrix.models[model_name]
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
    mp.start_processes(_rank, args=(model_name, layout, full, ids, str(tmp_path / "logits")), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        ours = torch.load(tmp_path / f"logits.{rank}")
        # vocab-parallel logits (parallel_output=True under TP) hold this rank's slice of the vocabulary
        theirs_r = theirs.chunk(2, dim=-1)[rank] if ours.shape[-1] != theirs.shape[-1] else theirs
        diff = (ours - theirs_r).abs().max().item()
        print(f"{model_name} {layout.model_dump(exclude_defaults=True)} rank {rank}: max |logit diff| = {diff:.2e}")
        assert diff < tolerance
