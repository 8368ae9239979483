"""Every episode logs the rollout–trainer mismatch, weight-sync bytes and peak memory; --mllog writes events."""

import json
import subprocess
import sys


def test_episode_row_has_mismatch_sync_and_memory_and_mllog(repo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", "run.episodes=1", "--mllog",
                          "--run-dir", str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the torch engine and the trainer compute the same raw log-probs after a sync: ~float rounding apart
    assert row["mismatch/logprob_abs_diff_max"] < 1e-5
    assert abs(row["mismatch/token_mult_prob_error"] - 1) < 1e-5
    assert row["sync/bytes"] > 0 and row["memory/peak_rss_mib"] > 0
    assert ":::MLLOG" in out.stdout and "run_stop" in (tmp_path / "mllog.txt").read_text()
    assert not any(key.startswith("tis/") for key in row)  # grpo.tis_cap is off by default
    # samples.jsonl: run.samples_per_episode (default 4) prompts with one response each, its reward and log-probs
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["episode"] for s in samples} == {1}
    for s in samples:
        assert s["prompt"] and isinstance(s["response"], str) and s["reward"] in (0.0, 1.0) and s["ground_truth"]
        assert s["logprobs"] and all(lp <= 0 for lp in s["logprobs"])


def test_samples_off_and_cut_back_on_resume(tmp_path):
    from trainer.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    for episode in (1, 2, 3):
        log.samples(episode, [{"prompt": "p", "response": "r", "reward": 1.0}])
    log.samples(4, [])  # run.samples_per_episode=0: nothing written
    with (tmp_path / "samples.jsonl").open("a") as f:
        f.write('{"episode": 4, "pro')  # a kill in mid-write
    log.truncate_after(2)  # resumed from the checkpoint of episode 2
    assert [json.loads(line)["episode"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 2]


def test_tis_cap_override_logs_its_weights(repo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer", "tiny-qwen2.5", "run.episodes=2", "grpo.tis_cap=2",
                          "--run-dir", str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "config.json").read_text())["resolved"]["recipe"]["grpo"]["tis_cap"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:  # engine and trainer agree to float rounding: every weight ~1, none reaches the cap
        assert abs(row["tis/weight_mean"] - 1) < 1e-5 and row["tis/clipped_fraction"] == 0
