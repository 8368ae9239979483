"""Per-episode metrics: `metrics.jsonl` always (one flushed line per episode), TensorBoard and W&B on request.

metrics.jsonl is the only interface between the trainer and `bench/`: keys are stable and flat
(`reward/mean`, `time/rollout`, `throughput/tokens_per_s`, ...). Loggers that are off are not called.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.atomic import DiskFull, is_disk_full, write_json

STAGES = ("rollout", "old_logprob", "ref_logprob", "reward", "train", "sync", "eval", "checkpoint")


class StageTimer:
    """Seconds per loop stage for one episode; every stage of STAGES is reported, 0.0 when it did not run.

    Given the platform, also the memory of each stage that ran: ``memory/<stage>/peak_mib`` (the device's peak
    during the stage on GPU; on CPU the process's peak RSS so far, which cannot be reset) and
    ``memory/<stage>/allocated_mib`` after it."""

    def __init__(self, platform=None) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.platform = platform
        self.memory: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.platform is not None:
            self.platform.reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start
            if self.platform is not None:
                for key, mib in self.platform.memory().items():
                    name = f"memory/{stage}/{key}_mib"
                    self.memory[name] = max(self.memory.get(name, 0.0), mib) if key == "peak" else mib

    def as_metrics(self) -> dict[str, float]:
        return ({f"time/{k}": v for k, v in self.seconds.items()} | {"time/episode": sum(self.seconds.values())}
                | self.memory)


def length_stats(lengths: torch.Tensor, max_len: int) -> dict[str, float]:
    """Response length mean, p25/p50/p75, max and the share that hit the limit (ChatLearn's set)."""
    x = lengths.float()
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]))
    return {"response_length/mean": x.mean().item(), "response_length/p25": q[0].item(),
            "response_length/p50": q[1].item(), "response_length/p75": q[2].item(),
            "response_length/max": x.max().item(),
            "response_length/clip_ratio": (lengths >= max_len).float().mean().item()}


def _append(path: Path, text: str, run_dir: Path, what: str) -> None:
    """Append ``text`` (whole JSON lines) and flush it to disk; a full disk is one DiskFull naming ``what``."""
    try:
        with path.open("a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if is_disk_full(exc):  # a torn line, if any, is dropped on resume (_truncate_jsonl)
            raise DiskFull(run_dir, len(text), what) from None
        raise


def _truncate_jsonl(path: Path, episode: int) -> int:
    """Cut ``path`` in place after the last whole line of an episode ≤ ``episode``; returns that episode (0: none)."""
    if not path.exists():
        return 0
    keep, last = 0, 0
    with path.open("rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n") or not isinstance(row, dict) or row.get("episode", episode + 1) > episode:
                break
            keep, last = keep + len(line), row["episode"]
    os.truncate(path, keep)
    return last


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None, mllog: bool = False):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.started = time.time()
        self._sinks: list[tuple[Callable[[int, dict], object], Callable[[], object]]] = []  # (log, close)
        self.mllog = None
        if mllog:  # `:::MLLOG` lines on stdout and in mllog.txt; close it with "aborted" first when a run stops
            from trainer.mllog import MLLogger

            self.mllog = MLLogger(run_dir / "mllog.txt", metadata={"recipe": (config or {}).get("name")})
            self._sinks.append((self.mllog.log, self.mllog.close))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `logging` extra

            writer = SummaryWriter(str(run_dir / "tensorboard"))
            self._sinks.append((lambda step, row: [writer.add_scalar(k, v, step) for k, v in row.items()
                                                   if isinstance(v, int | float)], writer.close))
        if wandb_project:
            import wandb  # needs the `logging` extra and WANDB_API_KEY

            run = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {})
            self._sinks.append((lambda step, row: run.log(row, step=step), run.finish))

    def close(self) -> None:
        """Flush and close the optional loggers (metrics.jsonl is flushed on every line already)."""
        for _, close in self._sinks:
            close()

    def truncate_after(self, episode: int) -> int:
        """Drop rows past ``episode`` (a resumed run rewrites what followed its checkpoint) and a torn last line
        (a kill in mid-write), in place so that it needs no free space; returns the last episode kept (0: none).
        samples.jsonl is cut the same way."""
        _truncate_jsonl(self.samples_path, episode)
        return _truncate_jsonl(self.path, episode)

    def log(self, episode: int, row: dict) -> None:
        row = {"episode": episode, "clock/unix": round(time.time(), 3), **row}  # a re-appended row keeps its own
        _append(self.path, json.dumps(row, sort_keys=True) + "\n", self.run_dir, f"the metrics row of episode {episode}")
        for sink, _ in self._sinks:
            sink(episode, row)

    def samples(self, episode: int, samples: list[dict]) -> None:
        """A few prompts of the episode with a response each, its reward and log-probs (samples.jsonl)."""
        if samples:
            _append(self.samples_path, "".join(json.dumps({"episode": episode, **s}) + "\n" for s in samples),
                    self.run_dir, f"the samples of episode {episode}")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write_summary(self, extra: dict) -> dict:
        """summary.json: first/last values of the main metrics plus `extra` (run dir, recipe, status)."""
        rows = self.rows()
        rewards = [r["reward/mean"] for r in rows]
        tenth = max(1, len(rewards) // 10)
        summary = {"episodes": len(rows), "wall_time_s": time.time() - self.started, **extra}
        evals = [r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r]
        if evals:
            summary["eval/reward_last"] = evals[-1]
        for key in ("memory/peak_rss_mib", "memory/peak_device_mib"):
            if any(key in r for r in rows):
                summary[key] = max(r.get(key, 0.0) for r in rows)
        if rewards:
            summary |= {"reward/first": rewards[0], "reward/last": rewards[-1],
                        "reward/first_10pct_mean": sum(rewards[:tenth]) / tenth,
                        "reward/last_10pct_mean": sum(rewards[-tenth:]) / tenth,
                        "throughput/tokens_per_s_mean": sum(r["throughput/tokens_per_s"] for r in rows) / len(rows)}
        try:
            write_json(self.run_dir / "summary.json", summary)
        except DiskFull as exc:  # the run's outcome is said on the console all the same
            if extra.get("status") == "finished":  # a stopped run's one line already says the disk is full
                print(f"warning: summary.json not written: {exc}", file=sys.stderr)
        return summary


class DiscardLog:
    """The log of a rank that is not the driver: only the driver writes run files (same interface)."""

    def log(self, episode: int, row: dict) -> None:
        pass

    def samples(self, episode: int, samples: list[dict]) -> None:
        pass

    def truncate_after(self, episode: int) -> int:
        return episode

    def write_summary(self, extra: dict) -> dict:
        return extra

    def close(self) -> None:
        pass
