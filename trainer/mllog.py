"""MLPerf-style log lines, `:::MLLOG {json}`, as a metrics sink (off unless asked for).

Each line is one event with MLPerf's fields (namespace, time_ms, event_type, key, value, metadata):
`run_start` when the logger opens, `block_start` / `block_stop` around each episode (an episode is MLPerf's
"block" of one epoch), `eval_accuracy` when the episode evaluated, `tracked_stats` with the episode's
throughput and reward, and `run_stop` with status success or aborted when it closes. Lines go to a stream
(stdout by default, where MLPerf's log parsers look) and, if given, are appended to a file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal, TextIO

EventType = Literal["INTERVAL_START", "INTERVAL_END", "POINT_IN_TIME"]
TRACKED = ("reward/mean", "throughput/tokens_per_s", "time/episode", "response_length/mean")


class MLLogger:
    def __init__(self, path: Path | None = None, *, stream: TextIO | None = None, namespace: str = "",
                 metadata: dict | None = None):
        self.path, self.stream, self.namespace = path, stream or sys.stdout, namespace
        self.event("run_start", event_type="INTERVAL_START", metadata=metadata)
        self._closed = False

    def event(self, key: str, value: object = None, *, event_type: EventType = "POINT_IN_TIME",
              metadata: dict | None = None, time_ms: float | None = None) -> str:
        line = ":::MLLOG " + json.dumps({
            "namespace": self.namespace,
            "time_ms": int(time.time() * 1000 if time_ms is None else time_ms),
            "event_type": event_type,
            "key": key,
            "value": value,
            "metadata": metadata or {},
        })
        print(line, file=self.stream, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")
        return line

    def log(self, episode: int, row: dict) -> None:
        """The events of one finished episode; `row` is its metrics.jsonl row (`time/episode` in seconds)."""
        now = time.time() * 1000
        block = {"first_epoch_num": episode, "epoch_count": 1}
        started = now - 1000 * float(row.get("time/episode", 0.0))
        self.event("block_start", event_type="INTERVAL_START", metadata=block, time_ms=started)
        if "eval/reward_mean" in row:
            self.event("eval_accuracy", row["eval/reward_mean"], metadata={"epoch_num": episode}, time_ms=now)
        stats = {k: row[k] for k in TRACKED if k in row}
        self.event("tracked_stats", stats, metadata={"step": episode}, time_ms=now)
        self.event("block_stop", event_type="INTERVAL_END", metadata=block, time_ms=now)

    def close(self, status: Literal["success", "aborted"] = "success") -> None:
        """`run_stop` once; later calls do nothing (a sink's close may run after an explicit abort)."""
        if not self._closed:
            self._closed = True
            self.event("run_stop", event_type="INTERVAL_END", metadata={"status": status})
