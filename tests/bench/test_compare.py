"""Comparison flags on results with known numbers: the planted rows and only they are flagged, a result
against itself flags nothing, and a change inside the noise is not flagged even when it crosses the threshold."""

import random

import pytest

from bench.compare import compare, episode_rates, flagged, summarise, verdicts
from bench.peak import Peak
from bench.result import Cell, Result

ENVIRONMENT = {"git": {"revision": "0" * 40, "dirty": False}, "image": {"name": "host"},
               "host": {"cpu": "test CPU", "cpu_count": 2}, "gpu": {"count": 0},
               "versions": {"torch": "2.13.0+cpu", "megatron-core": "0.16.1"}}
CELLS = [("tiny-qwen2.5", "single"), ("tiny-qwen2.5", "tp2"), ("tiny-qwen3", "single"), ("dense-512", "pp2")]


def make_result(slowdown: dict | None = None, noise: float = 0.02, seed: int = 0, name: str = "r") -> Result:
    """4 cells × 2 repeats × 6 episodes (1 warm-up); episode time 2 s × slowdown, jittered by ±noise."""
    rng = random.Random(seed)
    cells = []
    for repeat in range(2):
        for recipe, layout in CELLS:
            factor = (slowdown or {}).get((recipe, layout), 1.0)
            rows = []
            for episode in range(1, 7):
                jitter = 1 + noise * (2 * rng.random() - 1)
                seconds = 2.0 * factor * jitter * (3 if episode == 1 else 1)  # a slow warm-up episode
                rows.append({"episode": episode, "time/episode": seconds, "time/rollout": 0.6 * seconds,
                             "time/train": 0.4 * seconds, "throughput/tokens_per_s": 1000 / seconds,
                             "throughput/train_tokens_per_s": 2500 / seconds, "reward/mean": 0.1 * episode,
                             "bench/mfu_train": 0.01 / factor / jitter, "mismatch/kl": 1e-9 * episode})
            cells.append(Cell(recipe=recipe, layout=layout, image="host", gpus=1, repeat=repeat, status="ok",
                              returncode=0, seconds=30.0, command=["python", "-m", "trainer"], run_dir="runs/x",
                              peak_rss_mib=500.0, episodes=rows))
    return Result(id=name, suite="test", created="2026-01-01T00:00:00+00:00",
                  settings={"episodes": 6, "warmup_episodes": 1, "repeats": 2}, environment=ENVIRONMENT,
                  peak=Peak(device="cpu", flops_per_s=1e11, per_device=False, source="test"), cells=cells)


def test_summary_is_the_median_of_repeat_medians_over_the_steady_window():
    result = make_result(noise=0.0)
    s = summarise(result)
    assert s.loc[("tiny-qwen2.5", "single", "host"), ("time/episode", "median")] == pytest.approx(2.0)  # warm-up dropped


def test_self_comparison_flags_nothing():
    base = make_result(seed=1)
    table = compare(base, base, threshold=0.05)
    assert flagged(table) == [] and flagged(table, "improvement") == []
    assert (table["ratio"].dropna() == 1.0).all()


def test_planted_slowdown_flags_exactly_the_planted_rows():
    planted = {("tiny-qwen2.5", "tp2"): 1.5, ("dense-512", "pp2"): 1.3}
    table = compare(make_result(seed=1), make_result(planted, seed=2), threshold=0.10)
    assert sorted(flagged(table)) == sorted((r, layout, "host") for r, layout in planted)
    assert table.loc[("tiny-qwen2.5", "tp2", "host", "episode s"), "flag"] == "regression"
    assert table.loc[("tiny-qwen2.5", "tp2", "host", "tokens/s"), "ratio"] == pytest.approx(1 / 1.5, rel=0.05)


def test_speedup_is_an_improvement_not_a_regression():
    table = compare(make_result(seed=1), make_result({("tiny-qwen3", "single"): 0.5}, seed=2), threshold=0.10)
    assert flagged(table) == []
    assert flagged(table, "improvement") == [("tiny-qwen3", "single", "host")]


def test_change_inside_the_noise_is_not_flagged():
    # ±30% jitter per episode: a 12% slower median crosses the 10% threshold but the IQRs overlap
    base = make_result(noise=0.3, seed=3)
    cand = make_result({c: 1.12 for c in CELLS}, noise=0.3, seed=4)
    table = compare(base, cand, threshold=0.10)
    assert table.xs("episode s", level="metric")["ratio"].max() > 1.10  # the threshold alone would flag it
    assert flagged(table) == []
    # small steady noise: a 5% change stays under the threshold even though the bands separate
    table = compare(make_result(noise=0.005, seed=5), make_result({c: 1.05 for c in CELLS}, noise=0.005, seed=6), 0.10)
    times = table.xs("episode s", level="metric")
    assert (times["cand p25"] > times["base p75"]).all()  # the noise rule alone would flag it
    assert flagged(table) == []


def test_cells_missing_on_one_side_are_reported_not_flagged():
    base = make_result(seed=1)
    cand = make_result(seed=2)
    cand.cells[:] = [c for c in cand.cells if c.layout != "pp2"]
    v = verdicts(compare(base, cand, threshold=0.10))
    assert v[("dense-512", "pp2", "host")] == "missing in candidate"
    assert set(v.drop(("dense-512", "pp2", "host"))) == {""}


def test_episode_rate_is_wall_clock_per_repeat_pair_with_its_ratio_staleness_and_final_reward():
    """Two cells run as pairs: the second takes 2/3 of the first's wall time per episode → ratio 1.5."""
    cells = []
    for repeat in range(2):
        for name, seconds, staleness in (("staleness-0", 3.0, None), ("staleness-1", 2.0, 1)):
            rows = [{"episode": e, "clock/unix": 1000.0 + e * seconds,
                     "reward/mean": 0.5 if e > 9 else 0.1, **({"policy/staleness": staleness} if staleness else {})}
                    for e in range(1, 11)]
            rows[0]["clock/unix"] -= 40  # a slow warm-up episode: outside the steady window
            cells.append(Cell(recipe=name, layout="single", image="host", gpus=1, repeat=repeat, status="ok",
                              returncode=0, seconds=30.0, command=["python"], run_dir="x", episodes=rows))
    result = Result(id="pairs", suite="t", created="2026-01-01T00:00:00+00:00",
                    settings={"episodes": 10, "warmup_episodes": 1, "repeats": 2}, environment=ENVIRONMENT,
                    peak=Peak(device="cpu", flops_per_s=1e11, per_device=False, source="test"), cells=cells)
    rates = episode_rates(result).set_index(["cell", "repeat"])
    assert rates.loc[("staleness-0/single", 0), "episodes/s"] == pytest.approx(1 / 3)
    assert rates.loc[("staleness-1/single", 1), "ratio to first cell"] == pytest.approx(1.5)
    assert list(rates["max staleness"]) == [0, 1, 0, 1]
    assert rates.loc[("staleness-1/single", 0), "last-10% reward"] == pytest.approx(0.5)
