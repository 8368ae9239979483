"""Results → pandas tables: steady-window summaries, and candidates against the baseline (the first result).

A cell's value is the median over its repeats of each repeat's median over the steady window (the episodes
after the warm-up). Its noise band is the interquartile range of all its steady episodes pooled over repeats.
A change is flagged only when it is beyond the threshold AND the two noise bands do not overlap, so a
change inside the noise is never flagged, however large the threshold-crossing ratio looks.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

import pandas as pd

from bench.result import Result

KEYS = ["recipe", "layout", "image"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    lower_is_better: bool


# Compared and flagged; everything else numeric (reward, lengths, stages, mismatch) is shown, not flagged.
PERFORMANCE = [
    Metric("time/episode", "episode s", True),
    Metric("throughput/tokens_per_s", "tokens/s", False),
    Metric("bench/tokens_per_s_per_device", "tokens/s/device", False),
    Metric("throughput/generation_tokens_per_s", "generation tokens/s", False),
    Metric("throughput/train_tokens_per_s", "train tokens/s", False),
    Metric("bench/mfu_train", "MFU (train)", False),
    Metric("peak_rss_mib", "peak RSS MiB", True),
]
SHOWN = ["reward/mean", "response_length/mean", "time/sync", "sync/bytes", "bench/mfu_episode",
         "memory/peak_device_mib", "memory/optimizer_state_mib"]
MISMATCH_PREFIX = "mismatch/"


MFU_KEYS = ("bench/mfu_train", "bench/mfu_episode")


def _machine(result: Result) -> tuple:
    host = result.environment.get("host", {})
    return host.get("cpu"), host.get("cpu_count"), host.get("torch_threads"), host.get("platform")


def one_peak_per_machine(results: list[Result]) -> list[Result]:
    """The results with CPU MFU against one peak per machine: the median of the peaks its results measured.

    Each CPU suite run measures its own matmul peak, which moves by ±20% with the load; a candidate that
    measured a lower peak would show a higher MFU while its throughput fell. GPU peaks are declared, so kept."""
    measured = defaultdict(list)
    for r in results:
        if not r.peak.per_device:
            measured[_machine(r)].append(r.peak.flops_per_s)
    out = []
    for r in results:
        if r.peak.per_device:
            out.append(r)
            continue
        peaks = measured[_machine(r)]
        peak = statistics.median(peaks)
        scale = r.peak.flops_per_s / peak  # MFU was derived against r's own peak
        cells = [c.model_copy(update={"episodes": [{**e, **{k: e[k] * scale for k in MFU_KEYS if k in e}}
                                                    for e in c.episodes]}) for c in r.cells]
        source = f"{r.peak.source}; reported against the median of {len(peaks)} peak(s) measured on this machine"
        out.append(r.model_copy(update={"cells": cells,
                                        "peak": r.peak.model_copy(update={"flops_per_s": peak, "source": source})}))
    return out


def steady_episodes(result: Result) -> pd.DataFrame:
    """One row per steady episode of every successful cell: keys, repeat, episode and numeric metrics."""
    warmup = result.settings.get("warmup_episodes", 0)
    rows = [
        {**{k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)},
         "recipe": c.recipe, "layout": c.layout, "image": c.image, "repeat": c.repeat,
         "peak_rss_mib": c.peak_rss_mib}
        for c in result.cells if c.status == "ok"
        for row in c.episodes if row["episode"] > warmup
    ]
    return pd.DataFrame(rows, columns=None if rows else [*KEYS, "repeat", "episode"])


def summarise(result: Result) -> pd.DataFrame:
    """Per cell and metric: `median` (of per-repeat medians), `p25` and `p75` (pooled steady episodes).

    Columns are a (metric, stat) MultiIndex; rows are indexed by (recipe, layout, image).
    """
    df = steady_episodes(result)
    metrics = [c for c in df.columns if c not in (*KEYS, "repeat", "episode")]
    if df.empty or not metrics:
        return pd.DataFrame(index=pd.MultiIndex.from_tuples([], names=KEYS))
    grouped = df.groupby(KEYS)[metrics]
    median = df.groupby([*KEYS, "repeat"])[metrics].median().groupby(KEYS).median()
    stats = {"median": median, "p25": grouped.quantile(0.25), "p75": grouped.quantile(0.75)}
    return pd.concat(stats, axis=1).swaplevel(0, 1, axis=1).sort_index(axis=1)


def _flag(m: Metric, base: pd.Series, cand: pd.Series, threshold: float) -> str:
    if pd.isna(base["median"]) or pd.isna(cand["median"]) or base["median"] == 0:
        return ""
    change = cand["median"] / base["median"] - 1
    worse = change > threshold if m.lower_is_better else change < -threshold
    better = change < -threshold if m.lower_is_better else change > threshold
    separated = cand["p25"] > base["p75"] or cand["p75"] < base["p25"]
    if not separated:
        return ""
    return "regression" if worse else "improvement" if better else ""


def compare(baseline: Result, candidate: Result, threshold: float) -> pd.DataFrame:
    """Candidate against baseline, one row per (recipe, layout, image, metric) over the performance metrics:
    medians, noise bands (p25–p75), ratio candidate / baseline and the flag. Cells missing on one side
    have NaN on that side and no flag."""
    base, cand = summarise(baseline), summarise(candidate)
    index = base.index.union(cand.index)
    rows = []
    for m in PERFORMANCE:
        has = [m.key in s.columns.get_level_values(0) for s in (base, cand)]
        b = base[m.key].reindex(index) if has[0] else pd.DataFrame(columns=["median", "p25", "p75"], index=index)
        c = cand[m.key].reindex(index) if has[1] else pd.DataFrame(columns=["median", "p25", "p75"], index=index)
        for i in index:
            rows.append({**dict(zip(KEYS, i, strict=True)), "metric": m.label,
                         "base": b.loc[i, "median"], "base p25": b.loc[i, "p25"], "base p75": b.loc[i, "p75"],
                         "cand": c.loc[i, "median"], "cand p25": c.loc[i, "p25"], "cand p75": c.loc[i, "p75"],
                         "flag": _flag(m, b.loc[i], c.loc[i], threshold)})
    table = pd.DataFrame(rows, columns=[*KEYS, "metric", "base", "base p25", "base p75", "cand", "cand p25",
                                        "cand p75", "flag"])
    table[["base", "base p25", "base p75", "cand", "cand p25", "cand p75"]] = table[
        ["base", "base p25", "base p75", "cand", "cand p25", "cand p75"]].astype(float)
    table.insert(table.columns.get_loc("flag"), "ratio", table["cand"] / table["base"])
    return table.set_index([*KEYS, "metric"])


def verdicts(table: pd.DataFrame) -> pd.Series:
    """Per (recipe, layout, image): "regression" if any metric regressed, else "improvement" if any improved,
    else "" (a cell missing on one side says so)."""
    def one(flags: pd.DataFrame) -> str:
        if flags["base"].isna().all() or flags["cand"].isna().all():
            return "missing in " + ("baseline" if flags["base"].isna().all() else "candidate")
        values = set(flags["flag"])
        return "regression" if "regression" in values else "improvement" if "improvement" in values else ""

    return table.groupby(level=KEYS).apply(one).rename("verdict")


def flagged(table: pd.DataFrame, verdict: str = "regression") -> list[tuple[str, str, str]]:
    v = verdicts(table)
    return [tuple(i) for i in v.index[v == verdict]]


def cell_table(result: Result) -> pd.DataFrame:
    """Medians of one result per cell: performance, stage seconds, reward, lengths, mismatch metrics."""
    s = summarise(result)
    if s.empty:
        return pd.DataFrame()
    present = s.columns.get_level_values(0).unique()
    wanted = [m.key for m in PERFORMANCE] + sorted(k for k in present if k.startswith("time/") and k != "time/episode")
    wanted += SHOWN + sorted(k for k in present if k.startswith(MISMATCH_PREFIX))
    return pd.DataFrame({k: s[k]["median"] for k in wanted if k in present})


def failures(result: Result) -> pd.DataFrame:
    rows = [{"recipe": c.recipe, "layout": c.layout, "image": c.image, "exit": c.returncode,
             "last stderr line": (c.stderr_tail.strip().splitlines() or [""])[-1][:200]}
            for c in result.cells if c.status == "failed"]
    return pd.DataFrame(rows, columns=[*KEYS, "exit", "last stderr line"])


def curves(result: Result, key: str = "reward/mean") -> pd.DataFrame:
    """Every episode (warm-up included) of `key`, mean over repeats: index episode, one column per cell."""
    rows = [{"cell": f"{c.recipe}/{c.layout}", "episode": r["episode"], key: r.get(key)}
            for c in result.cells if c.status == "ok" for r in c.episodes]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).pivot_table(index="episode", columns="cell", values=key, aggfunc="mean")


def episode_rates(result: Result) -> pd.DataFrame:
    """Per cell and repeat: steady episodes per second of wall clock (``clock/unix`` of the first and last steady
    rows: everything an episode costs, overlapped or not), that rate over the first cell's in the same repeat
    (a suite's repeats interleave its cells, so each repeat is a pair run back to back), the mean reward of the
    last 10% of episodes and the largest ``policy/staleness`` logged (absent: a synchronous run, 0)."""
    warmup = result.settings.get("warmup_episodes", 0)
    rows = []
    for c in result.cells:
        steady = [r for r in c.episodes if r["episode"] > warmup and "clock/unix" in r]
        if c.status != "ok" or len(steady) < 2:
            continue
        last = c.episodes[-max(1, len(c.episodes) // 10):]
        rows.append({"cell": f"{c.recipe}/{c.layout}", "repeat": c.repeat,
                     "episodes/s": (len(steady) - 1) / (steady[-1]["clock/unix"] - steady[0]["clock/unix"]),
                     "last-10% reward": sum(r["reward/mean"] for r in last) / len(last),
                     "max staleness": max(r.get("policy/staleness", 0) for r in c.episodes),
                     "load (1 min)": c.load_average[0] if c.load_average else None})
    table = pd.DataFrame(rows, columns=["cell", "repeat", "episodes/s", "last-10% reward", "max staleness",
                                        "load (1 min)"])
    if not table.empty:
        first = table["cell"].iloc[0]
        base = table[table["cell"] == first].set_index("repeat")["episodes/s"]
        table.insert(3, "ratio to first cell", table["episodes/s"] / table["repeat"].map(base))
    return table
