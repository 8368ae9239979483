"""`nox -s prepare -- RECIPE --from DIR` end to end on a tiny DeepSeek-V3 checkpoint in fp8 form (as the hub ships
DeepSeek-V3): a cast killed mid-way and redone cleanly, the config fixes, the conversion sharded for the recipe's
TP2 layout, MATH-lighteval preprocessed; the recipe then trains from it with no flags; a second prepare skips every
step; a changed input redoes exactly the steps that depend on it; without hub access, one line naming the step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from trainer.models.weight_files import HF_INDEX
from trainer.prepare.places import ROOT
from trainer.prepare.run import main

pytestmark = pytest.mark.slow
RECIPE, MODEL = "tiny-dsv3-math", "tiny-dsv3-fp8"
FP8_MAX = 448.0


def _to_fp8(directory: Path) -> None:
    """Quantise every linear weight the way the DeepSeek-V3 release is stored: e4m3 plus weight_scale_inv."""
    index = json.loads((directory / HF_INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(directory / shard)
        for name in list(tensors):
            t = tensors[name]
            if t.dim() == 2 and name.endswith("proj.weight"):
                scale = t.abs().max().float() / FP8_MAX  # one 128×128 block covers these tiny weights
                tensors[name] = (t.float() / scale).to(torch.float8_e4m3fn)
                tensors[name + "_scale_inv"] = scale.reshape(1, 1)
                index["weight_map"][name + "_scale_inv"] = shard
        save_file(tensors, directory / shard, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    # the release's multi-token-prediction layer: past the trained layers, not converted (DeepSeek-V3's layer 61)
    mtp = f"model.layers.{config['num_hidden_layers']}"
    hidden = config["hidden_size"]
    eh_proj = torch.randn(hidden, 2 * hidden)
    scale = eh_proj.abs().max() / FP8_MAX
    save_file({f"{mtp}.eh_proj.weight": (eh_proj / scale).to(torch.float8_e4m3fn),
               f"{mtp}.eh_proj.weight_scale_inv": scale.reshape(1, 1),
               f"{mtp}.enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
               f"{mtp}.shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)},
              directory / "model-mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"] |= {f"{mtp}.{n}": "model-mtp.safetensors"
                            for n in ("eh_proj.weight", "eh_proj.weight_scale_inv", "enorm.weight",
                                      "shared_head.norm.weight")}
    (directory / HF_INDEX).write_text(json.dumps(index))
    config.update(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
                  num_nextn_predict_layers=1)
    (directory / "config.json").write_text(json.dumps(config))


def _char_tokenizer(directory: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *map(chr, range(32, 127))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)


def _math_parquet(folder: Path, split: str, n: int) -> Path:
    rows = [{"problem": f"{a}+{a}", "level": "Level 1", "type": "Algebra", "solution": f"\\boxed{{{2 * a}}}"}
            for a in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, matrix, save_tiny_hf):
    root = tmp_path_factory.mktemp("prepare")
    ckpt = save_tiny_hf(matrix.models["tiny-moonlight"], root / "release", seed=3)
    _to_fp8(ckpt)
    _char_tokenizer(ckpt)
    raw = root / "math" / "data"
    _math_parquet(raw, "train", 8)
    _math_parquet(raw, "test", 2)
    data = yaml.safe_load((ROOT / "matrix.yaml").read_text())
    data["prepared"] = str(root / "prepared")
    data["models"][MODEL] = {**data["models"]["tiny-moonlight"], "hf_id": "test-org/tiny-dsv3-fp8",
                             "stands_in_for": None,
                             "prepare": [s for s in data["models"]["deepseek-v3-671b"]["prepare"]
                                         if s["step"] != "hf-to-mcore"]}
    data["recipes"][RECIPE] = {**data["recipes"]["tiny-moonlight"], "model": MODEL, "layout": "tp2-sp", "gpus": 2,
                               "data": {"source": "math-lighteval", "path": str(root / "data" / "train.parquet")},
                               "run": {"episodes": 1, "seed": 1234}}
    data["recipes"][RECIPE]["grpo"] = {**data["recipes"][RECIPE]["grpo"], "max_prompt_len": 96,
                                       "prompts_per_episode": 4}
    path = root / "matrix.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return {"root": root, "matrix": path, "ckpt": ckpt, "raw": raw.parent}


def prepare(setup, *extra: str) -> int:
    return main([RECIPE, "--matrix", str(setup["matrix"]), *extra])


def ran(out: str) -> list[str]:
    return [line.split("] ", 1)[1].split(":", 1)[0] for line in out.splitlines()
            if line.startswith("[") and "— running" in line]


def test_without_hub_access_one_line_names_the_step_and_from(setup):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    done = subprocess.run([sys.executable, "-m", "trainer.prepare", RECIPE, "--matrix", str(setup["matrix"])],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert line.startswith(f"error: prepare {RECIPE}: step {MODEL}/fetch: needs Hugging Face hub access to "
                           f"download test-org/tiny-dsv3-fp8 (") and line.endswith("pass `--from DIR`")


def test_prepare_then_train_then_skip_and_redo(setup, monkeypatch, capsys, matrix):
    from matrix import load_matrix
    from trainer.preflight import missing

    froms = ["--from", str(setup["ckpt"]), "--from", str(setup["raw"])]
    m = load_matrix(setup["matrix"])
    lacking = " ".join(missing(m.resolve(RECIPE), root=ROOT))
    assert f"make them with `nox -s prepare -- {RECIPE}`" in lacking  # train names the command before prepare

    # A cast killed after its first shard: nothing downstream exists, the manifest records nothing.
    import trainer.convert.fp8 as fp8

    real_save, calls = fp8.save_shard, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fp8, "save_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(setup, *froms)
    monkeypatch.setattr(fp8, "save_shard", real_save)
    prepared = setup["root"] / "prepared"
    model_dir = prepared / MODEL
    assert not (model_dir / "hf").exists() and not (model_dir / "bf16" / HF_INDEX).exists()
    assert "fp8-to-bf16" not in json.dumps(json.loads((prepared / "manifest.json").read_text())["steps"]) \
        if (prepared / "manifest.json").exists() else True
    capsys.readouterr()

    assert prepare(setup, *froms) == 0
    out = capsys.readouterr().out
    assert ran(out) == [f"{MODEL}/fp8-to-bf16", f"{MODEL}/config", f"{MODEL}/hf-to-mcore-tp2-sp",
                        "data/math-lighteval"], out
    bf16 = load_file(next((model_dir / "bf16").glob("*.safetensors")))
    assert all(t.dtype != torch.float8_e4m3fn for t in bf16.values())
    assert not any(n.endswith("_scale_inv") for n in json.loads((model_dir / "bf16" / HF_INDEX).read_text())["weight_map"])
    config = json.loads((model_dir / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    meta = json.loads((model_dir / "mcore-tp2-sp" / "mcore.json").read_text())
    assert meta["layout"] == "tp2-sp" and meta["degrees"]["tp"] == 2
    assert pq.read_table(setup["root"] / "data" / "train.parquet").num_rows == 10

    # The recipe trains from what prepare made, with no flags.
    done = subprocess.run([sys.executable, "-m", "trainer", RECIPE, "--matrix", str(setup["matrix"]),
                           "--runs", str(setup["root"] / "runs")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    weights = json.loads((run_dir / "config.json").read_text())["resolved"]["model"]["weights"]
    assert weights == str(model_dir / "mcore-tp2-sp")

    # Nothing changed: every step skipped.
    assert prepare(setup, *froms) == 0
    out = capsys.readouterr().out
    assert ran(out) == [] and out.count("done, skipped") == 4

    # Changed data: exactly the data step again.
    _math_parquet(setup["raw"] / "data", "test", 3)
    assert prepare(setup, *froms) == 0
    assert ran(capsys.readouterr().out) == ["data/math-lighteval"]

    # A changed release config: the weights chain (dry run: planned, nothing run), not the data.
    config = json.loads((setup["ckpt"] / "config.json").read_text())
    (setup["ckpt"] / "config.json").write_text(json.dumps({**config, "comment": "edited"}))
    assert prepare(setup, *froms, "--dry-run") == 0
    out = capsys.readouterr().out
    planned = [line.split("] ", 1)[1].split(":", 1)[0] for line in out.splitlines()
               if line.startswith("[") and "would run" in line]
    assert planned == [f"{MODEL}/fp8-to-bf16", f"{MODEL}/config", f"{MODEL}/hf-to-mcore-tp2-sp"], out
    assert "data/math-lighteval: preprocess MATH-lighteval (boxed ground truths) — done, skipped" in out


def test_too_little_disk_is_said_before_the_step(setup, monkeypatch, capsys):
    import trainer.prepare.run as run

    monkeypatch.setattr(run, "free_bytes", lambda path: 10)
    fresh = setup["root"] / "other-data"
    _math_parquet(fresh / "data", "train", 8)
    data = yaml.safe_load(setup["matrix"].read_text())
    data["prepared"] = str(setup["root"] / "prepared-2")
    data["recipes"][RECIPE]["data"]["path"] = str(setup["root"] / "data2" / "train.parquet")
    other = setup["root"] / "matrix-2.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main([RECIPE, "--matrix", str(other), "--from", str(setup["ckpt"]), "--from", str(fresh)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: prepare {RECIPE}: step {MODEL}/fp8-to-bf16: needs about ") and "free" in err
    assert not (setup["root"] / "prepared-2" / MODEL / "bf16").exists()
