"""MLPerf-style `:::MLLOG` lines: run_start first, per-episode block events, run_stop with the status last."""

import io
import json

from trainer.metrics import MetricsLog
from trainer.mllog import MLLogger


def events(text: str) -> list[dict]:
    lines = text.splitlines()
    assert all(line.startswith(":::MLLOG {") for line in lines)
    return [json.loads(line.removeprefix(":::MLLOG ")) for line in lines]


def test_a_run_logs_start_blocks_and_stop(tmp_path):
    stream, path = io.StringIO(), tmp_path / "mllog.txt"
    log = MLLogger(path, stream=stream, metadata={"recipe": "demo"})
    log.log(1, {"time/episode": 2.0, "reward/mean": 0.25, "throughput/tokens_per_s": 100.0})
    log.log(2, {"time/episode": 2.0, "reward/mean": 0.5, "eval/reward_mean": 0.4})
    log.close("aborted")
    log.close()  # a second close adds nothing
    got = events(stream.getvalue())
    assert path.read_text() == stream.getvalue()
    assert [e["key"] for e in got] == ["run_start", "block_start", "tracked_stats", "block_stop", "block_start",
                                       "eval_accuracy", "tracked_stats", "block_stop", "run_stop"]
    assert got[0]["event_type"] == "INTERVAL_START" and got[0]["metadata"] == {"recipe": "demo"}
    assert got[1]["metadata"] == {"first_epoch_num": 1, "epoch_count": 1}
    assert got[3]["time_ms"] - got[1]["time_ms"] == 2000  # the block spans the episode's seconds
    assert got[2]["value"] == {"reward/mean": 0.25, "throughput/tokens_per_s": 100.0, "time/episode": 2.0}
    assert got[5]["value"] == 0.4 and got[5]["metadata"] == {"epoch_num": 2}
    assert got[-1]["event_type"] == "INTERVAL_END" and got[-1]["metadata"] == {"status": "aborted"}


def test_metrics_log_option_writes_mllog_lines(tmp_path, capsys):
    log = MetricsLog(tmp_path, mllog=True, config={"name": "demo"})
    log.log(1, {"time/episode": 1.0, "reward/mean": 0.5})
    log.close()
    got = events((tmp_path / "mllog.txt").read_text())
    assert [e["key"] for e in got] == ["run_start", "block_start", "tracked_stats", "block_stop", "run_stop"]
    assert got[0]["metadata"] == {"recipe": "demo"} and got[-1]["metadata"] == {"status": "success"}
    assert capsys.readouterr().out == (tmp_path / "mllog.txt").read_text()
