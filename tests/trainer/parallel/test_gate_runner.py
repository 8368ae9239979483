"""The gate runner without running a gate: its disk cache (prepared rollouts only) is keyed by the
trainer's code, so an entry made by other code is never read and is deleted when a runner starts; bad arguments
get one line and exit 2."""

import pytest
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


@pytest.mark.parametrize(("argv", "message"), [
    (["no-such-gate"], "unknown gate 'no-such-gate'; gates: cp-equivalence"),
    (["tp-equivalence", "--candidate", "2"], "--candidate 2: gate tp-equivalence has candidates 0..1"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert run.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
