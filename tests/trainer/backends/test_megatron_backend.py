"""MegatronBackend: log-probs, train steps, non-finite guard, determinism, exact resume, HF weights."""

import pytest
import torch

from trainer.backends.errors import NonFiniteLossError
from trainer.backends.megatron import MegatronBackend
from trainer.parallel.process_groups import destroy_process_groups


@pytest.fixture
def resolved(matrix):
    return matrix.resolve("tiny-qwen2.5")


@pytest.fixture
def teardown():
    torch.set_num_threads(2)
    yield
    destroy_process_groups()


def batch(seed=0, b=6, t=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a right-padded row
    ids[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def nll_loss(logp, entropy, mb):
    """Mean next-token NLL over real tokens (a stand-in objective the model can lower)."""
    m = mb["attention_mask"][:, 1:].float()
    loss = -(logp * m).sum() / mb["tokens"]
    return loss, {"entropy_sum": (entropy * m).sum().item()}


def micro(n=2):
    mbs = [batch(seed=i) for i in range(n)]
    total = sum(mb["attention_mask"][:, 1:].sum() for mb in mbs)
    for mb in mbs:
        mb["tokens"] = total
    return mbs


def test_logprobs_match_log_softmax_of_model_logits(resolved, teardown):
    be = MegatronBackend(resolved, seed=0, trainable=False)
    mb = batch()
    logp, ent = be.logprobs(mb["input_ids"], mb["attention_mask"], with_entropy=True)
    assert logp.shape == ent.shape == (6, 11) and logp.dtype == torch.float32
    pos = torch.arange(12).expand(6, 12)
    with torch.no_grad():
        logits = be.model(mb["input_ids"], pos, None)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-6)
    p = torch.softmax(logits[:, :-1], -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), rtol=0, atol=1e-5)
    # right padding does not change the real tokens' log-probs (causal attention)
    short = be.logprobs(mb["input_ids"][:1, :8], mb["attention_mask"][:1, :8])
    torch.testing.assert_close(logp[0, :7], short[0], rtol=0, atol=1e-6)


def test_train_step_lowers_loss(resolved, teardown):
    be = MegatronBackend(resolved, seed=0)
    mbs = micro()
    losses = [be.train_step(mbs, nll_loss)["loss"] for _ in range(5)]
    stats = be.train_step(mbs, nll_loss)
    assert losses[-1] < losses[0] - 0.1, losses
    assert stats["lr"] == resolved.recipe.grpo.lr and stats["grad_norm"] > 0 and "entropy_sum" in stats


def test_non_finite_loss_raises_before_step_and_keeps_weights(resolved, teardown):
    be = MegatronBackend(resolved, seed=0)
    be.train_step(micro(), nll_loss)  # optimizer has state now
    before = {k: v.clone() for k, v in be.model.state_dict().items() if torch.is_tensor(v)}

    def nan_loss(logp, entropy, mb):
        return logp.sum() * float("nan"), {}

    with pytest.raises(NonFiniteLossError, match="loss"):
        be.train_step(micro(), nan_loss)
    after = be.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in be.model.parameters())


def test_non_finite_grad_norm_raises(resolved, teardown):
    be = MegatronBackend(resolved, seed=0)
    before = [p.clone() for p in be.model.parameters()]

    def inf_grad(logp, entropy, mb):  # finite loss value, infinite gradient
        w = be.model.decoder.final_layernorm.weight
        return logp.mean() + torch.sqrt(w - w.detach()).sum(), {}  # d sqrt(x)/dx at 0 = inf

    with pytest.raises(NonFiniteLossError, match="grad norm"):
        be.train_step(micro(1), inf_grad)
    assert all(torch.equal(a, b) for a, b in zip(before, be.model.parameters(), strict=True))


def run_three_steps(resolved, seed):
    be = MegatronBackend(resolved, seed=seed)
    stats = [be.train_step(micro(), nll_loss) for _ in range(3)]
    weights = {k: v.clone() for k, v in be.model.named_parameters()}
    destroy_process_groups()
    return stats, weights


def test_same_seed_is_bit_identical(resolved, teardown):
    s1, w1 = run_three_steps(resolved, 3)
    s2, w2 = run_three_steps(resolved, 3)
    s3, w3 = run_three_steps(resolved, 4)
    assert s1 == s2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not torch.equal(w1["embedding.word_embeddings.weight"], w3["embedding.word_embeddings.weight"])


def test_state_dict_resume_is_exact(resolved, teardown):
    be = MegatronBackend(resolved, seed=0)
    be.train_step(micro(), nll_loss)
    saved = be.state_dict()
    straight = [be.train_step(micro(), nll_loss) for _ in range(2)]
    final = {k: v.clone() for k, v in be.model.named_parameters()}
    other = MegatronBackend(resolved, seed=99)
    other.load_state_dict(saved)
    resumed = [other.train_step(micro(), nll_loss) for _ in range(2)]
    assert resumed == straight
    assert all(torch.equal(final[k], v) for k, v in other.model.named_parameters())


def test_hf_weights_round_trip_between_backends(resolved, teardown):
    a = MegatronBackend(resolved, seed=0)
    b = MegatronBackend(resolved, seed=1, trainable=False)
    mb = batch()
    assert not torch.allclose(a.logprobs(**mb), b.logprobs(**mb))
    b.load_hf(dict(a.hf_named_tensors()))
    assert torch.equal(a.logprobs(**mb), b.logprobs(**mb))


def test_multi_process_layout_and_unbuilt_family_are_refused(matrix, teardown):
    with pytest.raises(NotImplementedError, match="single-process"):
        MegatronBackend(
            matrix.resolve("tiny-qwen2.5").model_copy(update={"layout": matrix.layouts["tp2"]}), seed=0
        )
    with pytest.raises(NotImplementedError, match="qwen3_next"):
        MegatronBackend(matrix.resolve("tiny-qwen3-next"), seed=0)


def test_policy_and_reference_share_one_process(resolved, teardown):
    """The loop builds two backends in one process; the second must not tear down the first's groups."""
    from megatron.core import parallel_state

    policy = MegatronBackend(resolved, seed=0)
    group = parallel_state.get_tensor_model_parallel_group()
    ref = MegatronBackend(resolved, seed=0, trainable=False)
    assert parallel_state.get_tensor_model_parallel_group() is group
    mb = batch()
    assert torch.equal(policy.logprobs(**mb), ref.logprobs(**mb))
    policy.train_step(micro(), nll_loss)
    assert not torch.equal(policy.logprobs(**mb), ref.logprobs(**mb))
