"""Checkpoints: the newest KEEP survive pruning, `latest` names the newest, and a re-save replaces."""

import pytest
import torch

from matrix.layout import ParallelLayout
from trainer import checkpoint
from trainer.parallel.job import Job

ONE_PROCESS = Job(ParallelLayout(world_size=1))


def _episodes(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("episode-*"))


def _save(run_dir, episode, value):
    checkpoint.save(run_dir, episode, {"episode": episode, "w": torch.full((2,), float(value))}, ONE_PROCESS)


def test_pruning_keeps_the_newest_and_latest_points_at_the_last_save(tmp_path):
    for episode in range(1, 6):
        _save(tmp_path, episode, episode)
    assert _episodes(tmp_path) == [f"episode-{e:06d}" for e in range(6 - checkpoint.KEEP, 6)]
    episode, state = checkpoint.latest(tmp_path)
    assert episode == 5 and torch.equal(state["w"], torch.full((2,), 5.0))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # no half-written directory left


def test_resaving_an_episode_replaces_it(tmp_path):
    _save(tmp_path, 1, 0)
    _save(tmp_path, 2, 0)
    _save(tmp_path, 2, 7)  # a resumed run writing episode 2 again
    assert _episodes(tmp_path) == ["episode-000001", "episode-000002"][-checkpoint.KEEP:]
    assert torch.equal(checkpoint.latest(tmp_path)[1]["w"], torch.full((2,), 7.0))


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.latest(tmp_path) is None


# --- damaged or partial checkpoints (issue 21.4): the newest complete one is resumed, the others skipped ---------


def _two_saves(run_dir):
    _save(run_dir, 1, 1)
    _save(run_dir, 2, 2)
    return run_dir / "checkpoints"


def _truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


DAMAGES = {
    "truncated rank file": (lambda root: _truncate(root / "episode-000002" / "rank-00000.pt", 100),
                            "rank-00000.pt has 100 bytes, its manifest says"),
    "0-byte rank file": (lambda root: _truncate(root / "episode-000002" / "rank-00000.pt", 0),
                         "rank-00000.pt has 0 bytes"),
    "missing rank file": (lambda root: (root / "episode-000002" / "rank-00000.pt").unlink(),
                          "rank-00000.pt is missing"),
    "no manifest (a save cut short)": (lambda root: (root / "episode-000002" / checkpoint.MANIFEST).unlink(),
                                       "no manifest.json (its save did not finish)"),
    "garbage manifest": (lambda root: (root / "episode-000002" / checkpoint.MANIFEST).write_text("{"),
                         "its manifest.json is unreadable"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, damage):
    make, reason = DAMAGES[damage]
    make(_two_saves(tmp_path))
    assert checkpoint.latest_episode(tmp_path)[0] == 1
    (line,) = checkpoint.recover(tmp_path)
    assert line.startswith(f"skipped checkpoint {tmp_path / 'checkpoints' / 'episode-000002'}: {reason}")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "episode-000001"
    assert checkpoint.latest(tmp_path)[1]["w"][0] == 1.0


def test_changed_contents_of_the_same_size_are_caught_by_the_hashes(tmp_path):
    rank_file = _two_saves(tmp_path) / "episode-000002" / "rank-00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[-30] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    (line,) = checkpoint.recover(tmp_path)
    assert line.endswith("rank-00000.pt differs from its manifest's sha256")
    assert checkpoint.latest_episode(tmp_path)[0] == 1


@pytest.mark.parametrize("pointer", [b"\x00\xffgarbage", b"", None, b"episode-000009"])
def test_a_bad_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    """`latest` garbage, empty, missing or naming a missing folder: today IndexError or "no checkpoint there"."""
    latest = _two_saves(tmp_path) / "latest"
    latest.unlink() if pointer is None else latest.write_bytes(pointer)
    assert checkpoint.latest_episode(tmp_path)[0] == 2
    assert checkpoint.recover(tmp_path) == [] and latest.read_text() == "episode-000002"


def test_recovery_clears_what_an_interrupted_save_left(tmp_path):
    root = _two_saves(tmp_path)
    (root / ".tmp-episode-000003").mkdir()
    (root / ".tmp-episode-000003" / "rank-00000.partial").write_bytes(b"half")
    checkpoint.recover(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["episode-000001", "episode-000002", "latest"]


def test_nothing_complete_means_a_fresh_start(tmp_path):
    root = _two_saves(tmp_path)
    for episode in (1, 2):
        (root / f"episode-{episode:06d}" / "rank-00000.pt").write_bytes(b"")
    assert checkpoint.latest_episode(tmp_path) is None
    assert len(checkpoint.recover(tmp_path)) == 2 and not (root / "latest").exists()


def test_a_torn_last_metrics_line_is_dropped_in_place(tmp_path):
    """Today: JSONDecodeError, so the run can never resume."""
    from trainer.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    for episode in (1, 2, 3):
        log.log(episode, {"reward/mean": 0.5})
    with log.path.open("a") as f:
        f.write('{"episode": 4, "rew')
    assert log.truncate_after(2) == 2
    assert [r["episode"] for r in log.rows()] == [1, 2]
