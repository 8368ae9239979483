"""CP chunking arithmetic (pure): which positions each CP rank holds, and where the boundaries are."""

import torch

from trainer.parallel.cp import chunk_boundaries, local_positions, next_token_labels


def test_rank_i_holds_chunks_i_and_2cp_minus_1_minus_i():
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([local_positions(24, 3, r) for r in range(3)])
    assert sorted(held.tolist()) == list(range(24))  # every position exactly once


def test_labels_come_from_the_full_sequence():
    ids = torch.arange(8).unsqueeze(0)
    labels = next_token_labels(ids)
    assert labels.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    # rank 0 holds positions 0, 1, 6, 7: its label at position 1 is token 2, which lives on rank 1
    assert labels[0, local_positions(8, 2, 0)].tolist() == [1, 2, 7, 0]


def test_boundaries_sit_on_both_sides_of_each_chunk_edge():
    assert chunk_boundaries(8, 2).tolist() == [1, 2, 3, 4, 5, 6]
