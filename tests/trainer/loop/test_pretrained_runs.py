"""`python -m trainer RECIPE model.weights=DIR`: the run starts from DIR's weights, on one process and on two
(pipeline stages), the reference model too; a directory that does not fit is one line, exit 2, nothing written."""

import re
import subprocess
import sys

import pytest
import torch

from trainer.checkpoint import latest_episode
from trainer.convert.hf_mcore import hf_to_mcore
from trainer.convert.sharded import write_sharded
from trainer.models.hf_checkpoint import load_hf_checkpoint
from trainer.models.weight_map import hf_to_mcore as hf_names_to_mcore

# 1 episode = 1 optimizer step at lr 1e-3 (the tiny recipes'): Adam moves each weight by about lr at most
# (plus weight decay's lr·0.01·|w|), while the seed's initialisation is O(0.1) away from the file's weights.
RUN = ["tiny-qwen3", "run.episodes=1", "grpo.kl_coef=0.01"]
ONE_STEP = 2e-3
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, matrix, save_tiny_hf):
    root = tmp_path_factory.mktemp("weights")
    hf = save_tiny_hf(matrix.models["tiny-qwen3"], root / "hf", seed=11)
    return {"hf": hf, "mcore": hf_to_mcore(hf, root / "mcore")}


@pytest.fixture(scope="module")
def expected(dirs, matrix):
    """The file's weights under global megatron names (what the run's checkpoints hold)."""
    tensors, _ = load_hf_checkpoint(dirs["hf"])
    return hf_names_to_mcore(tensors, matrix.models["tiny-qwen3"])


def trainer(repo, *args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=repo, capture_output=True, text=True,
                          timeout=600)


def checkpointed(run_dir, world: int, layers_per_stage: int) -> dict[str, dict[str, torch.Tensor]]:
    """{"policy", "reference"} → whole weights under global names, from every PP stage's rank file."""
    _, directory = latest_episode(run_dir)
    out = {"policy": {}, "reference": {}}
    for rank in range(world):
        state = torch.load(directory / f"rank-{rank:05d}.pt", weights_only=False)
        for model in out:
            for name, t in state[model]["model"].items():
                global_name = _LAYER.sub(lambda m, r=rank: f"decoder.layers.{int(m.group(1)) + r * layers_per_stage}.",
                                         name)
                out[model][global_name] = t
    return out


def assert_started_from(saved, expected):
    assert sorted(saved["reference"]) == sorted(expected)
    for name, tensor in expected.items():
        # the reference model is never trained: exactly the file's weights
        assert torch.equal(saved["reference"][name], tensor), name
        # the policy took one step from them
        assert (saved["policy"][name] - tensor).abs().max() <= ONE_STEP, name


def test_one_process_run_starts_from_the_hf_checkpoint_and_resumes_from_its_checkpoint(repo, tmp_path, dirs, expected):
    run_dir = tmp_path / "run"
    out = trainer(repo, *RUN, f"model.weights={dirs['hf']}", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_started_from(checkpointed(run_dir, 1, 2), expected)
    # a resumed run continues from its checkpoint: the weights directory is not even looked at
    out = trainer(repo, *RUN, "run.episodes=2", f"model.weights={tmp_path / 'gone'}", "--resume", str(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert latest_episode(run_dir)[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "sharded-pp2"])
def test_two_stage_run_starts_from_the_megatron_core_conversion(repo, tmp_path, dirs, expected, sharded):
    """From the unsharded conversion each stage reads the whole tensors of its layers; from the conversion
    sharded for pp2 (`hf-to-mcore --layout pp2`) each stage reads only its own file."""
    weights = write_sharded(dirs["hf"], tmp_path / "pp2", "pp2") if sharded else dirs["mcore"]
    out = trainer(repo, *RUN, "layout=pp2", "gpus=2", f"model.weights={weights}", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_started_from(checkpointed(tmp_path / "run", 2, 1), expected)


@pytest.mark.slow
def test_tensor_parallel_run_starts_from_the_conversion_sharded_for_it(repo, tmp_path, dirs):
    """Each TP rank's reference model holds exactly its file of `hf-to-mcore --layout tp2` (same local names),
    and the run trains: the shards are TP shards to megatron too (gathered for weight sync, reduced in backward)."""
    from safetensors.torch import load_file

    sharded = write_sharded(dirs["hf"], tmp_path / "tp2", "tp2")
    out = trainer(repo, *RUN, "layout=tp2", "gpus=2", f"model.weights={sharded}", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    _, directory = latest_episode(tmp_path / "run")
    for rank in range(2):
        reference = torch.load(directory / f"rank-{rank:05d}.pt", weights_only=False)["reference"]["model"]
        stored = load_file(sharded / f"dense-tp{rank:02d}-pp000.safetensors")
        assert sorted(stored) == sorted(reference)
        for name, tensor in stored.items():
            assert torch.equal(reference[name], tensor), (rank, name)


def test_a_conversion_sharded_for_another_layout_is_one_line_exit_2(repo, tmp_path, dirs):
    sharded = write_sharded(dirs["hf"], tmp_path / "tp2", "tp2")
    out = trainer(repo, *RUN, "layout=pp2", "gpus=2", f"model.weights={sharded}", "--runs", str(tmp_path / "runs"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: model.weights: ") and "sharded for layout tp2 (tp=2 pp=1 ep=1 etp=2), but the " \
        "run's layout pp2 has tp=1 pp=2 ep=1 etp=1; convert the HF checkpoint again with `--layout pp2`" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("overrides", "words"), [
    (["model.shape.ffn_hidden=256"], "shape.ffn_hidden is 128 there but 256 in matrix model tiny-qwen3"),
    (["model=tiny-qwen2.5"], "family is 'qwen3' there but 'qwen2' in matrix model tiny-qwen2.5"),
], ids=["shape", "family"])
def test_weights_of_another_model_are_one_line_exit_2_and_nothing_written(repo, tmp_path, dirs, overrides, words):
    out = trainer(repo, *RUN, f"model.weights={dirs['hf']}", *overrides, "--runs", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: model.weights: ") and words in line, line
    assert not any(tmp_path.iterdir())


def test_missing_weights_directory_is_one_line_exit_2_and_nothing_written(repo, tmp_path):
    out = trainer(repo, *RUN, f"model.weights={tmp_path / 'nowhere'}", "--runs", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line == f"error: model.weights: {tmp_path / 'nowhere'}: not a directory"
    assert not any(tmp_path.iterdir())
