"""Checkpoints: the newest KEEP survive pruning, `latest` names the newest, and a re-save replaces."""

import torch

from trainer import checkpoint
from trainer.parallel.job import Job
from trainer.parallel.layout import ParallelLayout

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
