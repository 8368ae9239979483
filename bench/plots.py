"""The report's figures (matplotlib, no display): each function returns a PNG's bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from trainer.metrics import STAGES  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _label(index: tuple) -> str:
    result, recipe, layout = index[:3]
    return f"{recipe} / {layout}\n{result}"


def stage_times(tables: dict[str, pd.DataFrame]) -> bytes:
    """Median seconds per stage, stacked, one bar per (result, cell)."""
    present = {c for t in tables.values() for c in t.columns}
    stages = [f"time/{s}" for s in STAGES if f"time/{s}" in present]
    rows = [(name, *idx[:2], t.loc[idx, stages].fillna(0.0)) for name, t in tables.items() for idx in t.index
            if set(stages) <= set(t.columns)]
    fig, ax = plt.subplots(figsize=(10, 0.55 * max(len(rows), 3) + 1.5))
    left = [0.0] * len(rows)
    cmap = plt.get_cmap("tab10")
    for s_i, stage in enumerate(stages):
        widths = [float(r[3][stage]) for r in rows]
        ax.barh(range(len(rows)), widths, left=left, color=cmap(s_i % 10), label=stage.removeprefix("time/"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(rows)), [_label(r[:3]) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per episode (median of the steady window)")
    ax.set_title("Episode time by stage")
    if rows:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no successful run in these results", ha="center", va="center")
    return _png(fig)


def bars(tables: dict[str, pd.DataFrame], key: str, title: str, ylabel: str) -> bytes:
    """One group per cell (recipe / layout), one bar per result."""
    frame = pd.DataFrame({name: t[key] for name, t in tables.items() if key in t.columns})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(frame) + 3), 4))
    if frame.empty:
        ax.text(0.5, 0.5, f"no {key} in these results", ha="center", va="center")
    else:
        frame.index = [f"{i[0]}\n{i[1]}" for i in frame.index]
        frame.plot.bar(ax=ax, rot=0, width=0.8)
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelsize=8)
    return _png(fig)


def curves(frames: dict[str, pd.DataFrame], title: str, ylabel: str) -> bytes:
    """Lines per (result, cell) over episodes."""
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = ["-", "--", ":", "-."]
    for r_i, (name, frame) in enumerate(frames.items()):
        for cell in frame.columns:
            ax.plot(frame.index, frame[cell], styles[r_i % 4], marker=".", label=f"{cell} ({name})")
    ax.set_xlabel("episode")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    return _png(fig)
