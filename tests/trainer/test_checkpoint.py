"""Checkpoints: the newest KEEP survive pruning, `latest` names the newest, and a re-save replaces."""

import torch

from trainer import checkpoint


def _episodes(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("episode-*"))


def test_pruning_keeps_the_newest_and_latest_points_at_the_last_save(tmp_path):
    for episode in range(1, 6):
        checkpoint.save(tmp_path, episode, {"episode": episode, "w": torch.full((2,), float(episode))})
    kept = [f"episode-{e:06d}" for e in range(6 - checkpoint.KEEP, 6)]
    assert _episodes(tmp_path) == kept
    episode, state = checkpoint.latest(tmp_path)
    assert episode == 5 and torch.equal(state["w"], torch.full((2,), 5.0))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # no half-written directory left


def test_resaving_an_episode_replaces_it_and_prunes_nothing_newer(tmp_path):
    for episode in (1, 2):
        checkpoint.save(tmp_path, episode, {"episode": episode, "w": torch.zeros(1)})
    checkpoint.save(tmp_path, 2, {"episode": 2, "w": torch.ones(1)})  # a resumed run writing episode 2 again
    assert _episodes(tmp_path) == ["episode-000001", "episode-000002"][-checkpoint.KEEP:]
    assert torch.equal(checkpoint.latest(tmp_path)[1]["w"], torch.ones(1))


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.latest(tmp_path) is None
