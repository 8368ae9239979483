"""The one-device smoke check: every family's tiny recipe for a few episodes, fp32 and bf16, on whatever device
this process sees (``run.device: auto``), and one table.

    python -m trainer.smoke [--episodes 2] [--families dense,mla-moe,qwen3-next,fsdp2] [--runs DIR] [--json F]

Each run goes through the trainer's own command line (``trainer.cli``, in this process: one rank), so the
numbers are those of real runs: seconds per episode, the last episode's reward, the largest engine-vs-trainer
log-prob gap (``mismatch/logprob_abs_diff_max``), and peak memory (device on GPU, RSS on CPU). The
bf16-vs-fp32 column is the largest log-prob difference between the two precisions' models built from the same
weights, on one fixed batch. Exit code 1 if a run fails or a number is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

FAMILIES = {  # name in the table → (tiny recipe, overrides that make it one process)
    "dense": ("tiny-qwen2.5", []),
    "mla-moe": ("tiny-moonlight", []),
    "qwen3-next": ("tiny-qwen3-next", []),
    "fsdp2": ("tiny-qwen3-fsdp", ["layout=fsdp1", "gpus=1"]),
}
PRECISIONS = ("fp32", "bf16")


def run_one(recipe: str, overrides: list[str], precision: str, episodes: int, runs: Path) -> dict:
    """One run through the CLI; its metrics.jsonl rows summarised."""
    from trainer.cli import main

    runs = runs / f"{recipe}-{precision}"
    code = main(
        [
            recipe,
            f"run.episodes={episodes}",
            f"precision={precision}",
            "run.checkpoint_every=0",
            *overrides,
            "--runs",
            str(runs),
        ]
    )
    if code != 0:
        raise RuntimeError(f"{recipe} precision={precision}: the trainer exited with {code}")
    (run_dir,) = [d for d in runs.iterdir() if (d / "metrics.jsonl").exists()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peak = max(r.get("memory/peak_device_mib", r["memory/peak_rss_mib"]) for r in rows)
    return {
        "s_per_episode": sum(r["time/episode"] for r in rows) / len(rows),
        "reward": rows[-1]["reward/mean"],
        "engine_gap": max(r["mismatch/logprob_abs_diff_max"] for r in rows),
        "peak_mib": peak,
    }


def precision_gap(recipe: str, overrides: list[str]) -> float:
    """Largest |log p(bf16) − log p(fp32)| over real tokens of one fixed batch, both models from the same weights."""
    from matrix.schema import Layout
    from trainer.backends.base import build_backend
    from trainer.config import parse_overrides, resolve
    from trainer.parallel.process_groups import process_groups
    from trainer.platform import choose_platform

    resolved = resolve(recipe, parse_overrides(overrides))
    platform = choose_platform(resolved.recipe.run.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, resolved.model.shape.vocab, (4, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with process_groups(Layout(fsdp=resolved.layout.fsdp), platform):
        initial = dict(build_backend(resolved, seed=0, trainable=False, platform=platform).hf_named_tensors())
        initial = {k: v.to(torch.bfloat16).float() for k, v in initial.items()}  # both start from bf16 values
        logps = []
        for precision in PRECISIONS:
            r = resolved.model_copy(
                update={"recipe": resolved.recipe.model_copy(update={"precision": precision})}
            )
            backend = build_backend(r, seed=0, trainable=False, initial=initial, platform=platform)
            logps.append(platform.to_host(backend.logprobs(batch, micro_batch_size=4)))
    return float((logps[0] - logps[1]).abs().max())


def table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="smoke: tiny recipes, one process")
    for column in (
        "family",
        "precision",
        "s/episode",
        "reward",
        "engine-trainer gap",
        "peak MiB",
        "bf16-fp32 gap",
    ):
        t.add_column(column, justify="left" if column in ("family", "precision") else "right")
    for family, row in results.items():
        for precision in PRECISIONS:
            r = row[precision]
            t.add_row(
                family,
                precision,
                f"{r['s_per_episode']:.2f}",
                f"{r['reward']:.3f}",
                f"{r['engine_gap']:.2e}",
                f"{r['peak_mib']:.0f}",
                f"{row['bf16_fp32_gap']:.2e}" if precision == "bf16" else "",
            )
    Console(width=120).print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=2, help="episodes per run (default 2)")
    p.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}"
    )
    p.add_argument("--runs", type=Path, help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown or args.episodes < 1:
        what = f"--families: unknown {', '.join(unknown)}" if unknown else f"--episodes: {args.episodes}"
        print(f"error: {what}; families: {', '.join(FAMILIES)}, episodes ≥ 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        runs = args.runs or Path(tmp)
        results = {}
        for family in chosen:
            recipe, overrides = FAMILIES[family]
            results[family] = {
                precision: run_one(recipe, overrides, precision, args.episodes, runs)
                for precision in PRECISIONS
            }
            results[family]["bf16_fp32_gap"] = precision_gap(recipe, overrides)
    table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    numbers = [
        v
        for row in results.values()
        for r in row.values()
        for v in (r.values() if isinstance(r, dict) else [r])
    ]
    if not all(math.isfinite(v) for v in numbers):
        print("error: a smoke number is not finite (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
