"""A matrix model's prepare steps run in order on a checkpoint; the input directory is left as it was."""

import json

import pytest

from matrix.schema import PrepareStep
from trainer.convert.__main__ import main
from trainer.models.weight_files import WeightsError
from trainer.prepare.steps import prepare_model_dir


def copy_with_config(src, dst, **extra):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **extra}))
    return dst


def test_deepseek_v3_config_steps_make_the_checkpoint_convertible(hf_dirs, tmp_path):
    src = copy_with_config(hf_dirs["tiny-moonlight"], tmp_path / "in", num_nextn_predict_layers=1,
                           quantization_config={"quant_method": "fp8"})
    steps = [
        PrepareStep(step="drop-config-key", why="bf16 now", args={"key": "quantization_config"}),
        PrepareStep(step="set-config", why="no MTP", args={"num_nextn_predict_layers": 0}),
        PrepareStep(step="hf-to-mcore", why="train", args={"gpus": 1}),
    ]
    with pytest.raises(WeightsError, match="'num_nextn_predict_layers'"):  # without the config steps
        prepare_model_dir(steps[2:], src, tmp_path / "raw")
    assert len(prepare_model_dir(steps, src, tmp_path / "out")) == 3
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    assert (tmp_path / "out" / "mcore" / "mcore.json").exists()
    assert "quantization_config" in json.loads((src / "config.json").read_text())  # input untouched


def test_moonlight_prepare_from_the_matrix(hf_dirs, tmp_path, capsys):
    assert main(["prepare", "moonlight-16b-a3b", str(hf_dirs["tiny-moonlight"]), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekV3ForCausalLM"
    assert "hf-to-mcore" in capsys.readouterr().out
    assert main(["prepare", "no-such-model", str(hf_dirs["tiny-moonlight"]), str(tmp_path / "o2")]) == 2
