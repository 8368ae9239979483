"""What `nox -s report` compares: with no arguments, the pair chosen by the time recorded in each result (a fresh
clone's file times are checkout order), printed; CPU MFU against one peak per machine, so a re-measured peak cannot
turn a slower candidate into an "improvement"."""

import json
import os
import shutil

import pandas as pd

from bench import cli
from bench.report import write_report
from bench.result import load_result
from tests.conftest import REPO

RESULTS = REPO / "bench" / "results"
BEFORE_1, AFTER_1 = "demo-curve-20261124T104005Z-af994214", "demo-curve-20261124T104125Z-8bca69c8"
BEFORE_2, AFTER_2 = "demo-curve-20261124T104301Z-af994214", "demo-curve-20261124T104419Z-8bca69c8"


def test_no_arguments_compare_the_newest_pair_by_recorded_time(tmp_path, monkeypatch, capsys):
    """The README's pair (second before → second after), whatever order the files were checked out in: here the
    two "before" results have the newest file times, which is what the old choice compared."""
    results = tmp_path / "results"
    results.mkdir()
    for mtime, name in enumerate([AFTER_2, AFTER_1, "cpu-20261124T104553Z-bb1935dc", BEFORE_2, BEFORE_1]):
        shutil.copy(RESULTS / f"{name}.json", results / f"{name}.json")
        os.utime(results / f"{name}.json", (1e9 + mtime, 1e9 + mtime))
    monkeypatch.setattr(cli, "RESULTS", results)
    assert cli.main(["report", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert (
        f"baseline {BEFORE_2} (2026-11-24T10:44:13+00:00), candidate {AFTER_2} (2026-11-24T10:45:16+00:00)"
        in out
    )
    assert (
        (tmp_path / "report" / "report.md")
        .read_text()
        .startswith(f"# Bench report: {BEFORE_2} vs {AFTER_2}\n")
    )


def test_a_lower_remeasured_peak_is_not_an_mfu_improvement(tmp_path):
    """The same runs 2% slower, but their suite measured a matmul peak 20% lower: MFU against each run's own peak
    rose ×1.23 and was flagged an improvement; against the machine's one peak it falls with the throughput."""
    base = load_result(RESULTS / f"{BEFORE_2}.json")
    data = json.loads(base.model_dump_json())
    data |= {"id": "slower", "created": "2026-11-24T11:00:00+00:00"}
    data["peak"]["flops_per_s"] *= 0.8
    for cell in data["cells"]:
        for row in cell["episodes"]:
            for key in list(row):
                if key.startswith("throughput/"):
                    row[key] *= 0.98
                elif key.startswith("time/"):
                    row[key] /= 0.98
                elif key.startswith("bench/mfu_"):
                    row[key] *= 0.98 / 0.8  # what the bench derived against the lower peak
    slower = type(base).model_validate(data)
    write_report([base, slower], tmp_path, threshold=0.1)
    table = pd.read_csv(tmp_path / "comparison.csv")
    mfu = table[table["metric"] == "MFU (train)"]
    assert len(mfu) and (mfu["ratio"] < 1).all() and (mfu["flag"].fillna("") != "improvement").all(), mfu
