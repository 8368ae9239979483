"""hf-to-mcore --layout L writes one file per TP/PP/EP/ETP shard holding each rank's local tensors; mcore-to-hf reads
them back through the layout's ranks bit for bit; own_shard refuses other degrees; bad input leaves nothing behind."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.convert.__main__ import main
from trainer.models.weight_files import MCORE_META, WeightsError


def cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def sharded(hf_dirs, tmp_path_factory):
    """(model name, layout) → its sharded megatron-core directory, converted once per module (two gloo ranks)."""
    root, done = tmp_path_factory.mktemp("sharded"), {}

    def convert(name, layout):
        if (name, layout) not in done:
            out = root / f"{name}-{layout}"
            assert main(["hf-to-mcore", str(hf_dirs[name]), str(out), "--layout", layout]) == 0
            done[name, layout] = out
        return done[name, layout]

    return convert


def hf_tensors(read_checkpoint, directory):
    return read_checkpoint(directory)[1]


def test_tp2_files_hold_each_ranks_slices(sharded, hf_dirs, read_checkpoint):
    out = sharded("tiny-qwen3", "tp2")
    meta = json.loads((out / MCORE_META).read_text())
    assert meta["layout"] == "tp2" and meta["degrees"]["tp"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["dense-tp00-pp000.safetensors", "dense-tp01-pp000.safetensors",
                                                     MCORE_META]
    hf = hf_tensors(read_checkpoint, hf_dirs["tiny-qwen3"])
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    down = hf["model.layers.1.mlp.down_proj.weight"]
    for t, file in enumerate(["dense-tp00-pp000.safetensors", "dense-tp01-pp000.safetensors"]):
        local = load_file(out / file)
        half = slice(64 * t, 64 * (t + 1))
        # column-parallel fused [gate; up]: rank t holds [gate_t; up_t], half the rows
        assert torch.equal(local["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[half], up[half]]))
        # row-parallel: half the columns
        assert torch.equal(local["decoder.layers.1.mlp.linear_fc2.weight"], down[:, half])
        # replicated norms are whole on every rank
        assert torch.equal(local["decoder.final_layernorm.weight"], hf["model.norm.weight"])
        assert local["embedding.word_embeddings.weight"].shape == (128 // 2, 64)


@pytest.mark.slow
def test_ep2_expert_files_hold_half_the_experts_renumbered_from_zero(sharded, hf_dirs, read_checkpoint):
    out = sharded("tiny-qwen3-next", "ep2")
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "dense-tp00-pp000.safetensors", "experts-pp000-ep000-etp00.safetensors",
        "experts-pp000-ep001-etp00.safetensors"]
    hf = hf_tensors(read_checkpoint, hf_dirs["tiny-qwen3-next"])
    for ep in (0, 1):
        local = load_file(out / f"experts-pp000-ep{ep:03d}-etp00.safetensors")
        assert {int(k.split(".")[6]) for k in local} == {0, 1}  # decoder.layers.L.mlp.experts.local_experts.E.
        assert all(".experts.local_experts." in k for k in local)
        for e in (0, 1):
            assert torch.equal(local[f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc2.weight"],
                               hf[f"model.layers.2.mlp.experts.{2 * ep + e}.down_proj.weight"])
    assert not any(".experts.local_experts." in k for k in load_file(out / "dense-tp00-pp000.safetensors"))


# tp2 reuses the module's tp2 conversion (one more launch); the others convert and read back (two launches, ~15 s
# on two loaded cores).
@pytest.mark.parametrize("name,layout", [("tiny-qwen3", "tp2"),
                                         pytest.param("tiny-moonlight", "tp2-sp", marks=pytest.mark.slow),
                                         pytest.param("tiny-qwen3-next", "ep2", marks=pytest.mark.slow)])
def test_sharded_round_trip_is_bit_identical(sharded, hf_dirs, tmp_path, read_checkpoint, name, layout):
    src = hf_dirs[name]
    assert main(["mcore-to-hf", str(sharded(name, layout)), str(tmp_path / "back"), "--like", str(src)]) == 0
    index, original = read_checkpoint(src)
    back_index, back = read_checkpoint(tmp_path / "back")
    assert back_index == index and set(back) == set(original)
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)


def test_own_shard_refuses_other_degrees_and_reads_the_unsharded_form(sharded, hf_dirs, matrix, tmp_path):
    from trainer.models.build import build_gpt_model
    from trainer.models.sharded_weights import own_shard
    from trainer.parallel.process_groups import process_groups

    single = tmp_path / "single"
    assert main(["hf-to-mcore", str(hf_dirs["tiny-moonlight"]), str(single)]) == 0
    with process_groups():
        gpt = build_gpt_model(matrix.models["tiny-qwen3"], seed=0)
        with pytest.raises(WeightsError) as refused:
            own_shard(gpt, sharded("tiny-qwen3", "tp2"))
        moonlight = build_gpt_model(matrix.models["tiny-moonlight"], seed=0)
        tensors = own_shard(moonlight, single)
    message = str(refused.value)
    assert "\n" not in message
    assert "layout tp2 (tp=2 pp=1 ep=1 etp=2)" in message and "this process runs tp=1 pp=1 ep=1 etp=1" in message
    assert "convert again with --layout single or use the unsharded form" in message
    # parameters and the router's expert bias (a buffer), under the one process's names
    assert set(tensors) == set(dict(moonlight.named_parameters())) | {
        f"decoder.layers.{i}.mlp.router.expert_bias" for i in (1, 2, 3)}


def test_verify_refuses_a_sharded_directory_in_one_line(sharded, hf_dirs, capsys):
    assert cli(["verify", str(hf_dirs["tiny-qwen3"]), str(sharded("tiny-qwen3", "tp2"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "convert with --layout single" in err[0], err


@pytest.mark.parametrize("name,layout,words", [
    ("tiny-qwen3", "tp9", "is not a matrix layout (moonlight-8,"),
    ("tiny-qwen3", "fsdp2", "FSDP runs load the HF checkpoint itself"),
    ("tiny-qwen3", "ep2", "--layout ep2: ep: model"),  # a dense model has no experts to split
    ("tiny-moonlight", "tp2", "needs sequence_parallel: true"),
])
def test_bad_layout_is_one_line_exit_2_and_writes_nothing(hf_dirs, tmp_path, capsys, name, layout, words):
    assert cli(["hf-to-mcore", str(hf_dirs[name]), str(tmp_path / "out"), "--layout", layout]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_contradicts_the_tensors_is_one_line_before_any_rank_starts(hf_dirs, tmp_path, capsys):
    """(Until the shape check, this contradiction reached the ranks, and each rank's own-shard check failed.)"""
    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dirs["tiny-qwen3"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96  # the tensors are 128 wide: a config that does not describe them
    (src / "config.json").write_text(json.dumps(config))
    assert cli(["hf-to-mcore", str(src), str(tmp_path / "out"), "--layout", "tp2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has shape [128, 64], but config.json describes [96, 64]" in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.slow
def test_the_ray_launcher_converts_both_ways_as_the_local_one(sharded, hf_dirs, tmp_path, read_checkpoint):
    """hf-to-mcore and mcore-to-hf with `--launcher ray` (a one-host cluster the launcher starts): the same files as
    the local launcher's conversion, byte for byte, and the HF checkpoint back bit for bit."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    src, local = hf_dirs["tiny-qwen3"], sharded("tiny-qwen3", "tp2")

    def convert(*args):
        out = subprocess.run([sys.executable, "-m", "trainer.convert", *args, "--launcher", "ray"], cwd=repo,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]

    convert("hf-to-mcore", str(src), str(tmp_path / "mcore"), "--layout", "tp2")
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "mcore") for p in (tmp_path / "mcore").rglob("*") if p.is_file())
    assert all((local / f).read_bytes() == (tmp_path / "mcore" / f).read_bytes() for f in files)
    convert("mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "back"), "--like", str(src))
    (index, original), (back_index, back) = read_checkpoint(src), read_checkpoint(tmp_path / "back")
    assert back_index == index and set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
