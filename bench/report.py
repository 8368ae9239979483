"""Write a comparison report of bench results: markdown, one self-contained HTML page, PNG plots and CSVs.

The first result is the baseline; every other one is compared with it (`bench.compare`). Output goes to
`reports/<baseline id>--<last candidate id>/` unless told otherwise; files are written whole (temp + rename).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from tqdm import tqdm

from bench import plots
from bench.compare import (
    cell_table,
    compare,
    curves,
    episode_rates,
    failures,
    flagged,
    one_peak_per_machine,
    verdicts,
)
from bench.result import Result
from trainer.atomic import write_bytes


def _results_table(named: dict[str, Result]) -> pd.DataFrame:
    rows = []
    for name, r in named.items():
        env = r.environment
        ok = sum(c.status == "ok" for c in r.cells)
        rows.append({"result": name, "id": r.id, "suite": r.suite, "created": r.created,
                     "revision": f"{(env['git']['revision'] or '?')[:10]}{' (dirty)' if env['git']['dirty'] else ''}",
                     "image": env["image"]["name"], "cpu": f"{env['host']['cpu']} ×{env['host']['cpu_count']}",
                     "gpus": env["gpu"]["count"], "torch": env["versions"]["torch"],
                     "megatron-core": env["versions"]["megatron-core"],
                     "peak GFLOP/s": round(r.peak.flops_per_s / 1e9, 1), "peak source": r.peak.source,
                     "cells ok/failed": f"{ok}/{len(r.cells) - ok}"})
    return pd.DataFrame(rows).set_index("result")


def _styled_html(table: pd.DataFrame) -> str:
    def colour(v):
        return f"class={v}" if v in ("regression", "improvement") else ""

    html = table.to_html(float_format="{:.4g}".format, na_rep="–")
    for word in ("regression", "improvement"):
        html = html.replace(f"<td>{word}</td>", f"<td {colour(word)}>{word}</td>")
    return html


def _md(table: pd.DataFrame) -> str:
    if table.empty:
        return "(none)"
    flat = table if isinstance(table.index, pd.RangeIndex) else table.reset_index()
    return flat.to_markdown(index=False, floatfmt=".4g")


def write_report(results: list[Result], out: Path, *, threshold: float) -> dict[str, list]:
    """Write the report of `results` (baseline first) into `out`; returns the flagged rows per candidate."""
    results = one_peak_per_machine(results)
    names = ["baseline"] + [f"candidate {i}" for i in range(1, len(results))]
    named = dict(zip(names, results, strict=True))
    title = "Bench report: " + " vs ".join(r.id for r in results)
    progress = tqdm(total=5 + len(results), desc="report", unit="step")

    comparisons, all_flags, csv_parts = [], {}, []
    for name, cand in list(named.items())[1:]:
        table = compare(results[0], cand, threshold)
        regressions, improvements = flagged(table), flagged(table, "improvement")
        all_flags[cand.id] = regressions
        summary = (f"{len(regressions)} regression(s): {', '.join('/'.join(k) for k in regressions) or 'none'}; "
                   f"{len(improvements)} improvement(s): {', '.join('/'.join(k) for k in improvements) or 'none'}")
        comparisons.append({"title": f"{name} ({cand.id}) against the baseline ({results[0].id})",
                            "summary": summary, "frame": table, "verdicts": verdicts(table).to_frame()})
        csv_parts.append(table.assign(candidate=cand.id, baseline=results[0].id))
        progress.update()

    cells = {name: cell_table(r) for name, r in named.items()}
    progress.update()
    figures = [
        ("Episode time by stage", "stage_times.png", plots.stage_times(cells)),
        ("Tokens/s per layout", "tokens_per_s.png",
         plots.bars(cells, "throughput/tokens_per_s", "End-to-end tokens/s per layout", "tokens/s")),
        ("MFU of the train stage", "mfu.png",
         plots.bars(cells, "bench/mfu_train", "MFU of the train stage (vs the recorded peak)", "MFU")),
        ("Reward curves", "reward.png",
         plots.curves({n: curves(r) for n, r in named.items()}, "Reward per episode (mean over repeats)",
                      "reward/mean")),
    ]
    progress.update()
    out.mkdir(parents=True, exist_ok=True)
    for _, filename, png in figures:
        write_bytes(out / filename, png)
    progress.update()

    summaries = [t.assign(result=named[n].id) for n, t in cells.items() if not t.empty]
    write_bytes(out / "summary.csv", (pd.concat(summaries).to_csv() if summaries else "").encode())
    if csv_parts:
        write_bytes(out / "comparison.csv", pd.concat(csv_parts).to_csv().encode())
    progress.update()

    results_table = _results_table(named)
    md = [f"# {title}", "",
          f"Threshold {threshold:.0%}: a change is flagged when its median moves beyond it and the interquartile "
          "ranges of the steady episodes do not overlap. Baseline = the first result.", "",
          "## Results", "", _md(results_table), ""]
    for c in comparisons:
        md += [f"## {c['title']}", "", f"Flagged: {c['summary']}", "", _md(c["verdicts"]), "",
               _md(c["frame"]), ""]
    for name, table in cells.items():
        md += [f"## Cells of {name} ({named[name].id})", "", _md(table), ""]
        rates = episode_rates(named[name])
        if len(rates["cell"].unique()) > 1:
            ratios = rates.groupby("cell", sort=False)["ratio to first cell"].median()
            md += ["### Episode rate (wall clock, steady episodes; repeats run the cells back to back)", "",
                   "Median ratio to the first cell: " + ", ".join(f"{k} {v:.3g}×" for k, v in ratios.items()), "",
                   _md(rates), ""]
        fails = failures(named[name])
        if not fails.empty:
            md += ["### Failed cells", "", _md(fails), ""]
    md += ["## Plots", ""] + [f"![{t}]({f})" for t, f, _ in figures] + [""]
    write_bytes(out / "report.md", "\n".join(md).encode())
    progress.update()

    template = Environment(loader=PackageLoader("bench", "templates"), undefined=StrictUndefined,
                           autoescape=False).get_template("report.html.j2")
    html = template.render(
        title=title, threshold_pct=f"{threshold:.0%}", results_table=results_table.to_html(),
        comparisons=[{"title": c["title"], "summary": c["summary"],
                      "table": _styled_html(c["verdicts"]) + _styled_html(c["frame"])}
                     for c in comparisons],
        cell_tables=[{"title": f"{n} ({named[n].id})", "table": _styled_html(t),
                      "failures": failures(named[n]).to_html(index=False) if not failures(named[n]).empty else ""}
                     for n, t in cells.items()],
        plots=[{"title": t, "data": base64.b64encode(png).decode()} for t, _, png in figures],
    )
    write_bytes(out / "report.html", html.encode())
    progress.update()
    progress.close()
    return all_flags
