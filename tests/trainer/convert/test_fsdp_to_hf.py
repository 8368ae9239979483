"""fsdp-to-hf: an HF checkpoint trained by two FSDP2 ranks, checkpointed per rank, merged back to HF with the
original shard layout, equals the trained model's weights; --groupgemm splits grouped expert tensors."""

import subprocess
import sys

import pytest
import torch

from trainer.convert.fsdp_hf import split_grouped


def train_and_checkpoint(resolved, hf_dir, run_dir):
    """One FSDP rank: start from the HF checkpoint, take a train step, checkpoint; the driver returns the
    trained whole weights."""
    from trainer import checkpoint
    from trainer.backends.fsdp import FSDPBackend
    from trainer.models.hf_checkpoint import load_hf_checkpoint
    from trainer.parallel.job import Job
    from trainer.parallel.layout import ParallelLayout
    from trainer.parallel.process_groups import destroy_process_groups, init_process_groups
    from trainer.worker import start_rank

    rank, world = start_rank()
    init_process_groups(resolved.layout, rank=rank, world_size=world)
    try:
        tensors, _ = load_hf_checkpoint(hf_dir)
        policy = FSDPBackend(resolved, seed=0, initial=tensors)
        ids = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "response_mask": torch.ones(4, 11)}

        def nll(tokens):
            return lambda logp, entropy, mb: (-(logp * mb["response_mask"]).sum() / tokens, {})

        policy.train_step(batch, nll, micro_batch_size=4)
        job = Job(ParallelLayout.of(resolved.layout, world), rank)
        checkpoint.save(run_dir, 1, {"episode": 1, "world_size": world, "policy": policy.state_dict()}, job)
        return policy.whole_weights()
    finally:
        destroy_process_groups()


@pytest.mark.slow
def test_hf_to_fsdp_training_to_hf_round_trip(matrix, tmp_path, hf_dirs, read_checkpoint):
    from trainer.parallel.launcher import launch

    like = hf_dirs["tiny-qwen3"]
    resolved = matrix.resolve("tiny-qwen3-fsdp")
    trained = launch(train_and_checkpoint, 2, resolved, like, tmp_path / "run")
    original_map, original = read_checkpoint(like)
    assert any(not torch.equal(trained[n], original[n]) for n in trained)  # the step changed the weights

    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "trainer.convert", "fsdp-to-hf", str(tmp_path / "run"), str(out),
                           "--like", str(like)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    index, tensors = read_checkpoint(out)
    assert index == original_map  # the original shard layout
    assert sorted(tensors) == sorted(original)
    for name, tensor in tensors.items():
        expected = trained.get(name, trained["model.embed_tokens.weight"])  # a tied head is the embedding
        assert torch.equal(tensor, expected), name
    assert (out / "config.json").read_text() == (like / "config.json").read_text()


def test_refuses_a_checkpoint_of_another_model_and_a_megatron_checkpoint(tmp_path, hf_dirs):
    from trainer.convert.__main__ import main

    episode = tmp_path / "episode-000001"
    episode.mkdir()
    shard = {"policy": {"model": {"model.norm.weight": torch.ones(3)}, "shapes": {"model.norm.weight": (3,)}}}
    torch.save(shard, episode / "rank-00000.pt")
    assert main(["fsdp-to-hf", str(episode), str(tmp_path / "out"), "--like", str(hf_dirs["tiny-qwen2.5"])]) == 2
    torch.save({"policy": {"model": {}}}, episode / "rank-00000.pt")
    assert main(["fsdp-to-hf", str(episode), str(tmp_path / "out"), "--like", str(hf_dirs["tiny-qwen2.5"])]) == 2
    assert not (tmp_path / "out").exists()


def test_groupgemm_splits_grouped_expert_tensors_per_expert():
    experts, inter, hidden = 3, 4, 5
    gate_up = torch.arange(experts * 2 * inter * hidden, dtype=torch.float32).reshape(experts, 2 * inter, hidden)
    down = torch.randn(experts, hidden, inter)
    split = dict(split_grouped("model.layers.0.mlp.experts.gate_up_proj", gate_up))
    split |= dict(split_grouped("model.layers.0.mlp.experts.down_proj", down))
    assert len(split) == 3 * experts
    for e in range(experts):
        assert torch.equal(split[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :inter])
        assert torch.equal(split[f"model.layers.0.mlp.experts.{e}.up_proj.weight"], gate_up[e, inter:])
        assert torch.equal(split[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], down[e])
    assert dict(split_grouped("model.norm.weight", down)) == {"model.norm.weight": down}



