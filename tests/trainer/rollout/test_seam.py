"""The engine seam on CPU: n samples per prompt, weight-sync buckets, the log-prob kind refusal."""

import pytest
import torch

from trainer.rollout import SamplingParams, TorchEngine
from trainer.rollout.buckets import MB, BucketTooSmall, flat_buckets
from trainer.rollout.factory import logprob_problem


def test_n_samples_per_prompt_are_the_repeated_prompts_samples(matrix):
    """The loop asks for n per prompt instead of repeating prompts: the torch engine's tokens stay those of the
    repeated batch (the demo's results depend on them)."""
    engine = TorchEngine(matrix.models["tiny-qwen2.5"], decode=str, seed=0)
    prompts = [[5, 6, 7], [9], [10, 11, 12, 13]]
    params = SamplingParams(max_tokens=6, seed=11)
    grouped = engine.generate(prompts, SamplingParams(max_tokens=6, seed=11, n=4))
    repeated = engine.generate([p for p in prompts for _ in range(4)], params)
    assert [o.token_ids for o in grouped] == [o.token_ids for o in repeated]
    assert [o.prompt_token_ids for o in grouped] == [p for p in prompts for _ in range(4)]
    assert len({tuple(o.token_ids) for o in grouped[:4]}) > 1  # the 4 samples of a prompt differ


def named(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        ("embed", torch.randn(128, 64, generator=g)),
        ("bias", torch.randn(3, generator=g).half()),
        ("ids", torch.arange(7)),
        ("norm", torch.randn(64, generator=g).to(torch.bfloat16)),
        ("proj", torch.randn(64, 128, generator=g)),
        ("empty", torch.zeros(0)),
    ]


def test_buckets_round_trip_and_never_exceed_their_bound():
    tensors = named()
    limit = 40_000  # the two 32 KiB matrices cannot share a bucket
    buckets = list(flat_buckets(iter(tensors), limit))
    assert len(buckets) >= 2 and all(b.nbytes <= limit for b in buckets)
    got = [kv for b in buckets for kv in b.tensors()]
    assert [n for n, _ in got] == [n for n, _ in tensors]  # stream order kept
    for (name, want), (_, have) in zip(tensors, got, strict=True):
        assert have.dtype == want.dtype and torch.equal(have, want), name


def test_a_tensor_larger_than_the_bound_is_one_line_naming_the_setting():
    with pytest.raises(
        BucketTooSmall,
        match=r"rollout.sync_bucket_mb=0.01: tensor embed alone is 0.0312 MB; set "
        r"rollout.sync_bucket_mb to at least 0.04",
    ):
        list(flat_buckets(iter(named()), int(0.01 * MB)))


@pytest.mark.parametrize(
    ("sampling", "refused"),
    [({}, False), ({"temperature": 0.7}, True), ({"top_p": 0.9}, True), ({"top_k": 20}, True)],
)
def test_processed_logprobs_are_refused_where_they_differ_from_raw(matrix, sampling, refused):
    r = matrix.resolve("demo-vllm")
    grpo = r.recipe.grpo.model_copy(update={"sampling": r.recipe.grpo.sampling.model_copy(update=sampling)})
    r = r.model_copy(update={"recipe": r.recipe.model_copy(update={"grpo": grpo})})
    assert logprob_problem("raw", "vllm", r) is None
    problem = logprob_problem("processed", "vllm", r)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith("rollout engine vllm returns processed log-probs") and "\n" not in problem
