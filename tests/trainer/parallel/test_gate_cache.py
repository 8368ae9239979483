"""The gates' disk cache (prepared rollouts, reference records) is keyed by the trainer's code: an entry made by
other code is never read, and is deleted when a runner starts."""

import torch

from matrix import load_matrix
from trainer.equivalence import run


def test_entries_of_other_code_are_deleted_and_fresh_ones_reused(tmp_path):
    current = run.code_fingerprint()
    stale = tmp_path / "0123456789ab-inputs-ffff.pt"
    torch.save({"made by": "yesterday's trainer"}, stale)
    runner = run.Runner(load_matrix(), tmp_path)
    assert not stale.exists()

    made = []
    first = runner._cached("record-x", lambda: made.append(1) or {"value": 1})
    again = run.Runner(load_matrix(), tmp_path)._cached("record-x", lambda: made.append(2) or {"value": 2})
    assert first == again == {"value": 1} and made == [1]
    assert (tmp_path / f"{current}-record-x.pt").exists()


def test_the_fingerprint_follows_the_source(tmp_path, monkeypatch):
    for folder in run.SOURCES:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.py").write_text("x = 1\n")
    monkeypatch.setattr(run, "ROOT", tmp_path)
    before = run.code_fingerprint.__wrapped__()
    (tmp_path / "trainer" / "code.py").write_text("x = 2\n")
    assert run.code_fingerprint.__wrapped__() != before
