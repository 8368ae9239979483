"""The one-device smoke check: every family's tiny recipe for a few episodes, fp32 and bf16, on whatever device
this process sees (``run.device: auto``), and one table.

    python -m trainer.smoke [--episodes 2] [--families dense,mla-moe,qwen3-next,fsdp2] [--runs DIR] [--json F]
                            [--timeout S]

Each run goes through the trainer's own command line (``trainer.cli``, one rank), so the numbers are those of
real runs: seconds per episode, the last episode's reward, the largest engine-vs-trainer log-prob gap
(``mismatch/logprob_abs_diff_max``), and peak memory (device on GPU, RSS on CPU). The bf16-vs-fp32 column is the
largest log-prob difference between the two precisions' models built from the same weights, on one fixed batch.

The smoke is what a first GPU machine runs, with minutes to spare: one failure must not hide the other numbers.
So each family runs in a process of its own (a crash, a hung kernel or a poisoned CUDA context ends that family
only), each of its cells (fp32 run, bf16 run, bf16-vs-fp32 gap) is caught on its own and given ``--timeout``
seconds, every cell is reported as it ends, and ``--json`` is rewritten after each one (a cut-short call keeps what
ran), with the error and traceback of each failed cell and the platform and package versions. Exit code 1 if a
cell fails or a number is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

import torch

FAMILIES = {  # name in the table → (tiny recipe, overrides that make it one process)
    "dense": ("tiny-qwen2.5", []),
    "mla-moe": ("tiny-moonlight", []),
    "qwen3-next": ("tiny-qwen3-next", []),
    "fsdp2": ("tiny-qwen3-fsdp", ["layout=fsdp1", "gpus=1"]),
}
PRECISIONS = ("fp32", "bf16")
GAP = "bf16_fp32_gap"
CELLS = (*PRECISIONS, GAP)  # what a family's process measures, in this order
PACKAGES = ("torch", "megatron-core", "transformer-engine", "transformers", "flash-attn")


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
    # the run just made: an earlier smoke given the same --runs left its own beside it
    run_dir = max((d for d in runs.iterdir() if (d / "metrics.jsonl").exists()),
                  key=lambda d: (d / "metrics.jsonl").stat().st_mtime_ns)
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
    platform = choose_platform(resolved.device)
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


def measure(family: str, cell: str, episodes: int, runs: Path) -> dict | float:
    recipe, overrides = FAMILIES[family]
    if cell == GAP:
        return precision_gap(recipe, overrides)
    return run_one(recipe, overrides, cell, episodes, runs)


def _family_process(family: str, episodes: int, runs: Path, conn) -> None:
    """A family's cells in order, each reported as it starts and as it ends (numbers, or its error)."""
    os.setsid()  # its own process group: a timeout kills whatever the runs started too
    for cell in CELLS:
        conn.send(("start", cell))
        try:
            result = measure(family, cell, episodes, runs)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0], "traceback": traceback.format_exc()}
        conn.send(("end", cell, result))
    conn.close()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_family(family: str, episodes: int, runs: Path, timeout_s: float, report) -> dict:
    """Every cell of ``family``, from a process of its own; ``report(family, cell, result)`` as each ends. A cell
    that outlasts ``timeout_s`` or whose process dies is an error, and the cells after it are not run."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_family_process, args=(family, episodes, runs, send), name=f"smoke-{family}")
    process.start()
    send.close()
    cells, current, deadline = {}, CELLS[0], time.monotonic() + timeout_s
    try:
        while len(cells) < len(CELLS):
            if not receive.poll(max(0.0, deadline - time.monotonic())):
                cells[current] = {"error": f"timed out after {timeout_s:g} s (--timeout)"}
                report(family, current, cells[current])
                break
            try:
                kind, cell, *result = receive.recv()
            except EOFError:
                process.join(10)
                cells[current] = {"error": f"the family's process died ({_describe_exit(process.exitcode)})"}
                report(family, current, cells[current])
                break
            if kind == "start":
                current, deadline = cell, time.monotonic() + timeout_s
            else:
                cells[cell] = result[0]
                report(family, cell, result[0])
    finally:
        if process.is_alive():
            os.killpg(process.pid, signal.SIGKILL)
        process.join()
    return {cell: cells.get(cell, {"error": f"not run: {current} ended the family's process"}) for cell in CELLS}


def failed(result) -> bool:
    return isinstance(result, dict) and "error" in result


def environment() -> dict:
    """The platform this process would train on, and the versions of the packages that decide the numbers."""
    from trainer.platform import choose_platform

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {**choose_platform("auto").describe(), "python": sys.version.split()[0],
            **{package: version(package) for package in PACKAGES}}


def table(environ: dict, results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "smoke: tiny recipes, one process each — " + ", ".join(f"{k} {v}" for k, v in environ.items() if v)
    t = Table(title=title)
    for column in ("family", "precision", "s/episode", "reward", "engine-trainer gap", "peak MiB", "bf16-fp32 gap"):
        t.add_column(column, justify="left" if column in ("family", "precision") else "right")
    for family, row in results.items():
        gap = "failed" if failed(row[GAP]) else f"{row[GAP]:.2e}"
        for precision in PRECISIONS:
            r = row[precision]
            numbers = (
                ["failed", "", "", ""]
                if failed(r)
                else [f"{r['s_per_episode']:.2f}", f"{r['reward']:.3f}", f"{r['engine_gap']:.2e}", f"{r['peak_mib']:.0f}"]
            )
            t.add_row(family, precision, *numbers, gap if precision == "bf16" else "")
    console = Console(width=140)
    console.print(t)
    for family, row in results.items():
        for cell, r in row.items():
            if failed(r):
                console.print(f"failed: {family} {cell}: {r['error']}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=2, help="episodes per run (default 2)")
    p.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}"
    )
    p.add_argument("--runs", type=Path, help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the numbers (and each failure's traceback) to this file")
    p.add_argument("--timeout", type=float, default=300, help="seconds each cell may take (default 300)")
    args = p.parse_args(argv)
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown or args.episodes < 1 or args.timeout <= 0:
        what = (f"--families: unknown {', '.join(unknown)}" if unknown
                else f"--episodes: {args.episodes}" if args.episodes < 1 else f"--timeout: {args.timeout:g}")
        print(f"error: {what}; families: {', '.join(FAMILIES)}, episodes ≥ 1, timeout > 0", file=sys.stderr)
        return 2
    environ = environment()
    print("smoke on " + ", ".join(f"{k} {v}" for k, v in environ.items() if v), flush=True)
    results: dict[str, dict] = {}

    def report(family: str, cell: str, result) -> None:
        if failed(result):
            print(f"smoke: {family} {cell}: FAILED: {result['error']}", file=sys.stderr, flush=True)
            if "traceback" in result:
                print(result["traceback"], file=sys.stderr, flush=True)
        else:
            print(f"smoke: {family} {cell}: done", flush=True)
        results.setdefault(family, {})[cell] = result
        if args.json:
            args.json.write_text(json.dumps({"environment": environ, "families": results}, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        runs = args.runs or Path(tmp)
        for family in chosen:
            results[family] = run_family(family, args.episodes, runs, args.timeout, report)
    if args.json:
        args.json.write_text(json.dumps({"environment": environ, "families": results}, indent=2) + "\n")
    table(environ, results)
    numbers = [
        v
        for row in results.values()
        for r in row.values()
        if not failed(r)
        for v in (r.values() if isinstance(r, dict) else [r])
    ]
    if any(failed(r) for row in results.values() for r in row.values()):
        return 1
    if not all(math.isfinite(v) for v in numbers):
        print("error: a smoke number is not finite (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
