"""Bad input to `python -m trainer` is one line on stderr, exit 2, no traceback, within seconds."""

import subprocess
import sys

import pytest

CASES = [
    (["nope"], "unknown recipe 'nope'; recipes: moonlight"),
    (["demo", "run.epsiodes=3"], "unknown key 'epsiodes'; valid keys here: episodes"),
    (["demo", "grpo.lr=-1"], "grpo.lr: -1: Input should be greater than 0"),
    (["demo", "layout=tp3"], "layout 'tp3' is not defined"),
    (["demo", "lr"], "argument 'lr': expected key=value"),
    (["demo", "grpo.kl_coef=0.01", "grpo.log_reference_kl=false"], "kl_coef 0.01 puts the KL in the loss"),
    (["demo", "grpo.log_reference_kl=maybe"], "grpo.log_reference_kl"),
    (["demo", "grpo.tis_cap=0.5"], "grpo.tis_cap: 0.5: tis_cap 0.5 < 1 would scale down"),
    (["demo", "layout=cp2", "gpus=2", "grpo.max_response_len=15"], "is not a multiple of 2·CP=4"),
    (["tiny-qwen3-next", "layout=cp2", "gpus=2"], "has gated delta-net (linear attention) layers"),
    (["qwen3-next"], "32 GPUs (layout qwen3-next-32, min 32), this machine has 0; it spans 4 nodes of 8: start it "
                     "with --launcher ray"),
    # under Ray the ranks' GPUs are on the cluster's nodes: the driver's own count is not asked
    (["qwen3-next", "--launcher", "ray"], "cannot run on this machine; missing: image sglang-te27"),
    (["qwen2.5-7b"], "weights of Qwen/Qwen2.5-7B-Instruct (neither prepared nor in the Hugging Face cache; make them "
                     "with `nox -s prepare -- qwen2.5-7b`)"),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_exit_2(repo, tmp_path, argv, words):
    out = subprocess.run([sys.executable, "-m", "trainer", *argv, "--runs", str(tmp_path)], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for rejected input"
