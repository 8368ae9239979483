"""hf-to-mcore → mcore-to-hf gives the HF checkpoint back bit for bit; verify compares logits; bad input is refused."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from trainer.convert.__main__ import main
from trainer.models.weight_files import HF_INDEX, MCORE_INDEX


def cli(argv):
    """Exit code of ``python -m trainer.convert argv`` (argparse's errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next"])
def test_round_trip_is_bit_identical_with_the_same_shards(hf_dirs, tmp_path, name, read_checkpoint):
    src = hf_dirs[name]
    assert len(set(json.loads((src / HF_INDEX).read_text())["weight_map"].values())) > 2  # really sharded
    assert main(["hf-to-mcore", str(src), str(tmp_path / "mcore")]) == 0
    mcore = json.loads((tmp_path / "mcore" / MCORE_INDEX).read_text())["weight_map"]
    assert all(k.startswith(("embedding.", "decoder.", "output_layer.")) for k in mcore)
    assert main(["mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "back"), "--like", str(src)]) == 0
    index, original = read_checkpoint(src)
    back_index, back = read_checkpoint(tmp_path / "back")
    assert back_index == index
    assert set(back) == set(original)
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


# Qwen3-Next's chunked delta rule amplifies fp32 rounding (tests/trainer/models/test_qwen3_next.py): 1e-3.
VERIFY = {
    "tiny-qwen3": ("1e-4", "decoder.layers.1.self_attention.linear_proj.weight"),
    "tiny-moonlight": ("1e-4", "decoder.layers.1.self_attention.linear_proj.weight"),
    "tiny-qwen3-next": ("1e-3", "decoder.layers.1.self_attention.out_proj.weight"),
}


@pytest.mark.parametrize("name", VERIFY)
def test_verify_passes_and_fails_on_a_planted_fault(hf_dirs, tmp_path, capsys, name):
    src = hf_dirs[name]
    tolerance, target = VERIFY[name]
    main(["hf-to-mcore", str(src), str(tmp_path / "mcore")])
    assert main(["verify", str(src), str(tmp_path / "mcore"), "--tolerance", tolerance]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("max |logit difference|") and line.endswith("ok")
    diff = float(line.split()[3])
    print(f"{name}: verify max |logit difference| {diff:.2e}")
    # plant a fault: one layer's output projection scaled by 1.01
    mcore = tmp_path / "mcore"
    shard_of = json.loads((mcore / MCORE_INDEX).read_text())["weight_map"]
    tensors = load_file(mcore / shard_of[target])
    tensors[target] = tensors[target] * 1.01
    from safetensors.torch import save_file

    save_file(tensors, mcore / shard_of[target])
    assert main(["verify", str(src), str(mcore), "--tolerance", tolerance]) == 1
    assert capsys.readouterr().out.strip().endswith("FAILED")


def test_unsupported_config_field_is_one_line_exit_2_and_writes_nothing(hf_dirs, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dirs["tiny-moonlight"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "trainer.convert", "hf-to-mcore", str(src), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "'quantization_config'" in lines[0], out.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize(
    "argv,words",
    [
        (["hf-to-mcore", "{src}", "{out}", "--layout", "tp9"], "is not a matrix layout"),
        (["hf-to-mcore", "{out}", "{out}"], "not found"),
        (["mcore-to-hf", "{src}", "{out}", "--like", "{src}"], "mcore.json: not found"),
        (["verify", "{src}"], "the following arguments are required"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(hf_dirs, tmp_path, capsys, argv, words):
    argv = [a.format(src=hf_dirs["tiny-qwen3"], out=tmp_path / "out") for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_in_checkpoint_is_named(hf_dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dirs["tiny-qwen2.5"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    index = json.loads((src / HF_INDEX).read_text())
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, src / "extra.safetensors")
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = "extra.safetensors"
    (src / HF_INDEX).write_text(json.dumps(index))
    assert main(["hf-to-mcore", str(src), str(tmp_path / "out")]) == 2
    assert "'model.layers.0.self_attn.q_norm.weight' has no megatron-core counterpart" in capsys.readouterr().err


def test_unknown_tensor_in_megatron_directory_is_one_line_exit_2_and_writes_nothing(hf_dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    mcore = tmp_path / "mcore"
    assert main(["hf-to-mcore", str(hf_dirs["tiny-qwen2.5"]), str(mcore)]) == 0
    index = json.loads((mcore / MCORE_INDEX).read_text())
    save_file({"decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(16)}, mcore / "extra.safetensors")
    index["weight_map"]["decoder.layers.0.self_attention.q_layernorm.weight"] = "extra.safetensors"
    (mcore / MCORE_INDEX).write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["mcore-to-hf", str(mcore), str(tmp_path / "back"), "--like", str(hf_dirs["tiny-qwen2.5"])]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]  # besides the progress bar
    assert line.startswith("error: ") and "Traceback" not in err
    assert "tensor 'decoder.layers.0.self_attention.q_layernorm.weight' does not belong to family qwen2" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mcore"]


@pytest.mark.parametrize(("name", "extra"), [
    ("tiny-moonlight", ["model.layers.4.eh_proj.weight", "model.layers.4.enorm.weight",
                        "model.layers.4.self_attn.kv_a_proj_with_mqa.weight"]),  # DeepSeek-V3's layer 61
    ("tiny-qwen3-next", ["mtp.fc.weight", "mtp.layers.0.input_layernorm.weight"]),
])
def test_multi_token_prediction_tensors_are_skipped_not_refused(hf_dirs, tmp_path, name, extra):
    """The hub's DeepSeek-V3 and Qwen3-Next checkpoints ship multi-token-prediction weights nothing here trains:
    conversion skips them (it refused the whole checkpoint, naming the first), and converts the rest as before."""
    from safetensors.torch import save_file

    src = tmp_path / "hf"
    shutil.copytree(hf_dirs[name], src)
    index = json.loads((src / HF_INDEX).read_text())
    save_file({n: torch.ones(4) for n in extra}, src / "mtp.safetensors")
    index["weight_map"] |= dict.fromkeys(extra, "mtp.safetensors")
    (src / HF_INDEX).write_text(json.dumps(index))
    assert main(["hf-to-mcore", str(src), str(tmp_path / "with")]) == 0
    assert main(["hf-to-mcore", str(hf_dirs[name]), str(tmp_path / "without")]) == 0
    with_mtp, without = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(f).items()}
                         for d in ("with", "without"))
    assert with_mtp.keys() == without.keys() and all(torch.equal(with_mtp[k], without[k]) for k in without)
