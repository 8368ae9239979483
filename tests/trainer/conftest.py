"""Fixtures (the matrix: tests/conftest.py): megatron process groups torn down after each test that uses them, tiny HF checkpoints."""

import pytest
import torch

from trainer.parallel.process_groups import process_groups


@pytest.fixture
def groups():
    """gloo world size 1 + megatron parallel_state (all degrees 1), destroyed after the test."""
    with process_groups():
        yield


def randomize_(module, seed, *, bias_suffix=("router.expert_bias", "e_score_correction_bias")):
    """Add 0.2·N(0, 1) to every parameter (norms and biases too, so no map error hides behind 1s and 0s) and
    set MoE routing-bias buffers to 0.3·U(0, 1): non-negative, because transformers masks unselected expert
    groups with score 0 and megatron with -inf, which agree only while biased scores stay positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith(bias_suffix):
                b.copy_(0.3 * torch.rand(b.shape, generator=g))
    return module


@pytest.fixture(scope="session")
def randomize():
    return randomize_


@pytest.fixture(scope="session")
def save_tiny_hf():
    """``save(model, directory, *, seed=0, shard="40KB")``: a transformers model of the matrix ``model``'s config
    with random weights (norms, expert bias too), saved sharded as the hub ships large models."""
    from transformers import AutoModelForCausalLM

    from trainer.models.config import hf_config

    def save(model, directory, *, seed=0, shard="40KB"):
        torch.manual_seed(seed)
        hf = randomize_(AutoModelForCausalLM.from_config(hf_config(model)), seed + 1)
        hf.save_pretrained(directory, max_shard_size=shard)
        return directory

    return save
