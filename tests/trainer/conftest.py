"""Fixtures: the matrix, and megatron process groups torn down after each test that uses them."""

import pytest
import torch

from matrix import load_matrix
from trainer.parallel.process_groups import process_groups


@pytest.fixture(scope="session")
def matrix():
    return load_matrix()


@pytest.fixture
def groups():
    """gloo world size 1 + megatron parallel_state (all degrees 1), destroyed after the test."""
    torch.set_num_threads(2)
    with process_groups():
        yield
