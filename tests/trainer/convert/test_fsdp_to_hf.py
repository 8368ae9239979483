"""fsdp-to-hf: an HF checkpoint trained by two FSDP2 ranks, checkpointed as a torch distributed checkpoint, merged
back to HF with the original shard layout, equals the trained model's weights; non-DCP and damaged checkpoints
are refused in one line; --groupgemm splits grouped expert tensors."""

import shutil
import subprocess
import sys

import pytest
import torch

from trainer.convert.fsdp_hf import split_grouped


def train_and_checkpoint(resolved, hf_dir, run_dir):
    """One FSDP rank: start from the HF checkpoint, take a train step, checkpoint; the driver returns the
    trained whole weights."""
    from matrix.layout import ParallelLayout
    from trainer import checkpoint
    from trainer.backends.fsdp import FSDPBackend
    from trainer.models.hf_checkpoint import load_hf_checkpoint
    from trainer.parallel.job import Job
    from trainer.parallel.rank import rank_session

    with rank_session(resolved.layout) as me:
        rank, world = me.rank, me.world
        tensors, _ = load_hf_checkpoint(hf_dir)
        policy = FSDPBackend(resolved, seed=0, initial=tensors)
        ids = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "response_mask": torch.ones(4, 11)}

        def nll(tokens):
            return lambda logp, entropy, mb: (-(logp * mb["response_mask"]).sum() / tokens, {})

        policy.train_step(batch, nll, micro_batch_size=4)
        job = Job(ParallelLayout.of(resolved.layout, world), rank)
        checkpoint.save(run_dir, 1, {"episode": 1, "world_size": world}, job, {"policy": policy})
        return policy.whole_weights()


@pytest.fixture(scope="module")
def fsdp_run(matrix, hf_dirs, tmp_path_factory):
    """A run directory with the checkpoint of two FSDP2 ranks that trained tiny-qwen3 for a step, and the
    trained whole weights."""
    from trainer.parallel.launcher import launch

    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    trained = launch(train_and_checkpoint, 2, matrix.resolve("tiny-qwen3-fsdp"), hf_dirs["tiny-qwen3"], run_dir)
    return run_dir, trained


def convert(ckpt, out, like):
    return subprocess.run([sys.executable, "-m", "trainer.convert", "fsdp-to-hf", str(ckpt), str(out),
                           "--like", str(like)], capture_output=True, text=True)


@pytest.mark.slow
def test_hf_to_fsdp_training_to_hf_round_trip(fsdp_run, tmp_path, hf_dirs, read_checkpoint):
    run_dir, trained = fsdp_run
    like = hf_dirs["tiny-qwen3"]
    original_map, original = read_checkpoint(like)
    assert any(not torch.equal(trained[n], original[n]) for n in trained)  # the step changed the weights
    episode = run_dir / "checkpoints" / "episode-000001"
    assert (episode / "policy" / ".metadata").is_file()  # a torch distributed checkpoint

    out = tmp_path / "hf"
    done = convert(run_dir, out, like)
    assert done.returncode == 0, done.stderr
    index, tensors = read_checkpoint(out)
    assert index == original_map  # the original shard layout
    assert sorted(tensors) == sorted(original)
    for name, tensor in tensors.items():
        expected = trained.get(name, trained["model.embed_tokens.weight"])  # a tied head is the embedding
        assert torch.equal(tensor, expected), name
    assert (out / "config.json").read_text() == (like / "config.json").read_text()
    assert convert(episode, tmp_path / "from-episode", like).returncode == 0


@pytest.mark.slow
def test_refuses_another_model_and_a_damaged_checkpoint_in_one_line(fsdp_run, tmp_path, hf_dirs):
    run_dir, _ = fsdp_run
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir / "checkpoints" / "episode-000001", damaged)
    cases = [(run_dir, hf_dirs["tiny-qwen2.5"], "not in"), (damaged, hf_dirs["tiny-qwen3"], "missing or damaged")]
    next(iter((damaged / "policy").glob("__1_*.distcp"))).write_bytes(b"")  # rank 1's shards lost
    for ckpt, like, says in cases:
        done = convert(ckpt, tmp_path / "out", like)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1 and says in errors[0], done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()
    (damaged / "policy" / ".metadata").write_bytes(b"torn")
    done = convert(damaged, tmp_path / "out", hf_dirs["tiny-qwen3"])
    assert done.returncode == 2 and "not a readable torch distributed checkpoint" in done.stderr, done.stderr


def test_refuses_a_megatron_checkpoint_and_a_directory_without_one(tmp_path, hf_dirs):
    from trainer.convert.__main__ import main

    episode = tmp_path / "episode-000001"
    episode.mkdir()
    torch.save({"policy": {"model": {"model.norm.weight": torch.ones(3)}}}, episode / "rank-00000.pt")
    like = str(hf_dirs["tiny-qwen3"])
    assert main(["fsdp-to-hf", str(episode), str(tmp_path / "out"), "--like", like]) == 2
    assert main(["fsdp-to-hf", str(tmp_path), str(tmp_path / "out"), "--like", like]) == 2
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



