"""MegatronBackend (one process): log-probs, train steps, non-finite guard, determinism, exact resume, weights."""

from pathlib import Path

import pytest
import torch

from trainer.backends.errors import NonFiniteLossError
from trainer.backends.megatron import MegatronBackend
from trainer.parallel.process_groups import destroy_process_groups, init_process_groups
from trainer.parallel.tp import vocab_parallel_logprobs


@pytest.fixture
def resolved(matrix):
    return matrix.resolve("tiny-qwen2.5")


def batch(seed=0, b=6, t=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a right-padded row
    ids[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "response_mask": mask[:, 1:].float()}


def nll(tokens):
    """Mean next-token NLL over real tokens (a stand-in objective the model can lower)."""

    def loss_fn(logp, entropy, mb):
        m = mb["response_mask"]
        loss = -torch.where(m.bool(), logp, 0).sum() / tokens
        return loss, {"entropy_sum": torch.where(m.bool(), entropy, 0).sum().item()}

    return loss_fn


def test_logprobs_match_log_softmax_of_model_logits(resolved, groups):
    be = MegatronBackend(resolved, seed=0, trainable=False)
    mb = batch()
    logp = be.logprobs(mb, micro_batch_size=4)
    assert logp.shape == (6, 11) and logp.dtype == torch.float32
    pos = torch.arange(12).expand(6, 12)
    with torch.no_grad():
        logits = be.model(mb["input_ids"], pos, None)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-6)
    # right padding does not change the real tokens' log-probs (causal attention)
    short = be.logprobs({k: v[:1, :8] if v.dim() == 2 and k != "response_mask" else v[:1, :7]
                         for k, v in mb.items()}, micro_batch_size=1)
    torch.testing.assert_close(logp[0, :7], short[0], rtol=0, atol=1e-6)


def test_vocab_parallel_logprobs_and_entropy_equal_log_softmax_and_never_score_padding(groups):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 5, 10, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    logp, ent = vocab_parallel_logprobs(logits, labels, vocab=7, with_entropy=True)  # columns 7..9: padding
    real = torch.log_softmax(logits[..., :7], -1)
    torch.testing.assert_close(logp, real.gather(-1, labels[..., None]).squeeze(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, -(real.exp() * real).sum(-1), rtol=0, atol=1e-5)


def test_train_step_lowers_loss(resolved, groups):
    be = MegatronBackend(resolved, seed=0)
    mb = batch()
    losses = [be.train_step(mb, nll, micro_batch_size=2)["loss"] for _ in range(5)]
    stats = be.train_step(mb, nll, micro_batch_size=2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert stats["lr"] == resolved.recipe.grpo.lr and stats["grad_norm"] > 0 and "entropy_sum" in stats


def test_loss_does_not_depend_on_micro_batch_size(resolved, groups):
    a, b = MegatronBackend(resolved, seed=0), MegatronBackend(resolved, seed=0)
    sa, sb = a.train_step(batch(), nll, micro_batch_size=1), b.train_step(batch(), nll, micro_batch_size=6)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-6)
    assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-5)


def test_non_finite_loss_raises_before_step_and_keeps_weights(resolved, groups):
    be = MegatronBackend(resolved, seed=0)
    be.train_step(batch(), nll, micro_batch_size=3)  # optimizer has state now
    before = {k: v.clone() for k, v in be.model.state_dict().items() if torch.is_tensor(v)}

    def nan_loss(tokens):
        return lambda logp, entropy, mb: (logp.sum() * float("nan"), {})

    with pytest.raises(NonFiniteLossError, match="loss"):
        be.train_step(batch(), nan_loss, micro_batch_size=3)
    after = be.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in be.model.parameters())


def test_non_finite_grad_norm_raises(resolved, groups):
    be = MegatronBackend(resolved, seed=0)
    before = [p.clone() for p in be.model.parameters()]

    def inf_grad(tokens):  # finite loss value, infinite gradient
        w = be.model.decoder.final_layernorm.weight
        return lambda logp, entropy, mb: (logp.mean() + torch.sqrt(w - w.detach()).sum(), {})  # d√x/dx at 0 = inf

    with pytest.raises(NonFiniteLossError, match="grad norm"):
        be.train_step(batch(), inf_grad, micro_batch_size=6)
    assert all(torch.equal(a, b) for a, b in zip(before, be.model.parameters(), strict=True))


def run_three_steps(resolved, seed):
    init_process_groups(resolved.layout)
    be = MegatronBackend(resolved, seed=seed)
    stats = [be.train_step(batch(), nll, micro_batch_size=3) for _ in range(3)]
    weights = {k: v.clone() for k, v in be.model.named_parameters()}
    destroy_process_groups()
    return stats, weights


def test_same_seed_is_bit_identical(resolved):
    s1, w1 = run_three_steps(resolved, 3)
    s2, w2 = run_three_steps(resolved, 3)
    s3, w3 = run_three_steps(resolved, 4)
    assert s1 == s2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not torch.equal(w1["embedding.word_embeddings.weight"], w3["embedding.word_embeddings.weight"])


def test_state_dict_resume_is_exact(resolved, groups):
    be = MegatronBackend(resolved, seed=0)
    be.train_step(batch(), nll, micro_batch_size=3)
    saved = be.state_dict()
    straight = [be.train_step(batch(), nll, micro_batch_size=3) for _ in range(2)]
    final = {k: v.clone() for k, v in be.model.named_parameters()}
    other = MegatronBackend(resolved, seed=99)
    other.load_state_dict(saved)
    resumed = [other.train_step(batch(), nll, micro_batch_size=3) for _ in range(2)]
    assert resumed == straight
    assert all(torch.equal(final[k], v) for k, v in other.model.named_parameters())


def test_hf_weights_and_whole_weights_round_trip_between_backends(resolved, groups):
    a = MegatronBackend(resolved, seed=0)
    b = MegatronBackend(resolved, seed=1, trainable=False)
    c = MegatronBackend(resolved, seed=2, trainable=False)
    mb = batch()
    assert not torch.allclose(a.logprobs(mb, micro_batch_size=6), b.logprobs(mb, micro_batch_size=6))
    b.load_hf(dict(a.hf_named_tensors()))
    assert torch.equal(a.logprobs(mb, micro_batch_size=6), b.logprobs(mb, micro_batch_size=6))
    c.load_whole(a.whole_weights())
    assert torch.equal(a.logprobs(mb, micro_batch_size=6), c.logprobs(mb, micro_batch_size=6))


def test_policy_and_reference_share_one_process(resolved, groups):
    """The loop builds two backends in one process; the reference starts as a copy of the policy."""
    policy = MegatronBackend(resolved, seed=0)
    ref = MegatronBackend(resolved, seed=5, trainable=False)
    ref.copy_weights_from(policy)
    mb = batch()
    assert torch.equal(policy.logprobs(mb, micro_batch_size=6), ref.logprobs(mb, micro_batch_size=6))
    policy.train_step(mb, nll, micro_batch_size=6)
    assert not torch.equal(policy.logprobs(mb, micro_batch_size=6), ref.logprobs(mb, micro_batch_size=6))


def test_a_resume_restores_the_platforms_device_generator(resolved, groups):
    """CUDA has a generator of its own beside the host's; the backend saves and restores whatever generators the
    platform names (here a CPU platform with a second generator standing for the device's)."""
    from tests.trainer.backends.device_generator import DeviceGeneratorPlatform

    platform = DeviceGeneratorPlatform()
    saved = MegatronBackend(resolved, seed=0, platform=platform).state_dict()
    expected = torch.rand(4, generator=platform.generator)
    MegatronBackend(resolved, seed=1, platform=platform).load_state_dict(saved)
    assert torch.equal(torch.rand(4, generator=platform.generator), expected)


@pytest.mark.parametrize("rate", [1e-3, 0.0])
def test_the_expert_bias_moves_by_its_rate_against_the_steps_token_counts(groups, rate):
    """``moe.expert_bias`` with ``bias_update_rate``: after each step a router's bias moves by the rate, up for
    experts that got fewer tokens than the average and down for those that got more (megatron's
    finalize_model_grads, which the backend's own gradient path replaces), and the counts restart. Before, the
    rate did nothing and the counts grew without end."""
    from trainer.config import parse_overrides, resolve

    r = resolve("tiny-moonlight", parse_overrides(["model.shape.moe.expert_bias=true",
                                                   f"model.shape.moe.bias_update_rate={rate}"]))
    be = MegatronBackend(r, seed=0)
    routers = [m for m in be.model.modules() if hasattr(m, "expert_bias")]
    before = [m.expert_bias.clone() for m in routers]
    counts = []

    def count(module, args, output):
        counts.append(module.local_tokens_per_expert.clone())

    hooks = [m.register_forward_hook(count) for m in routers]
    be.train_step(batch(vocab=r.model.shape.vocab), nll, micro_batch_size=6)
    for hook in hooks:
        hook.remove()
    for router, old, seen in zip(routers, before, counts, strict=True):
        expected = old + torch.sign(seen.mean() - seen) * rate
        assert torch.equal(router.expert_bias, expected)
        assert not router.local_tokens_per_expert.any()
    assert rate == 0 or any(not torch.equal(r.expert_bias, b) for r, b in zip(routers, before, strict=True))
    # the engine routes with the moved bias too: the weight sync carries it (HF's e_score_correction_bias)
    synced = dict(be.hf_named_tensors(compute_dtype=True))
    for layer, router in zip((1, 2, 3), routers, strict=True):  # layer 0 is dense
        assert torch.equal(synced[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"], router.expert_bias)


def test_a_checkpoint_serializes_the_live_state_without_copying_it(resolved, groups):
    """A copy of a bf16 run's model and optimizer state (~18 bytes per parameter) on the device at every checkpoint
    would not fit beside the run: ``save`` hands the checkpoint the live tensors, fp32 main copies included."""
    bf16 = resolved.model_copy(update={"recipe": resolved.recipe.model_copy(update={"precision": "bf16"})})
    be = MegatronBackend(bf16, seed=0)
    be.train_step(batch(), nll, micro_batch_size=3)
    state = be.save(Path("unused"))
    live = dict(be.model.named_parameters())
    assert all(state["model"][name].data_ptr() == p.data_ptr() for name, p in live.items())
    mains = {main.data_ptr() for _, main in be.optimizer.pairs}
    assert {t.data_ptr() for t in state["optimizer"]["main_params"]} == mains
    moments = {t.data_ptr() for s in be.optimizer.state.values() for t in s.values() if t.dim() > 0}
    assert moments and moments <= {t.data_ptr() for s in state["optimizer"]["state"].values() for t in s.values()}


def test_a_checkpoint_of_another_device_kind_resumes_with_this_devices_tracker_streams(resolved, groups):
    """megatron's RNG tracker holds the device's generator states (a GPU's Philox state is 16 bytes, the CPU's 5056):
    a CPU run's checkpoint resumed on a GPU, or the reverse, keeps the new device's streams instead of failing with
    "RNG state is wrong size" at the first fork."""
    from megatron.core import tensor_parallel

    be = MegatronBackend(resolved, seed=0)
    saved = be.state_dict()
    saved["rng"]["tracker"] = {name: torch.zeros(16, dtype=torch.uint8) for name in saved["rng"]["tracker"]}
    saved["rng"]["tracker_device"] = "another-kind"
    before = tensor_parallel.get_cuda_rng_tracker().get_states()
    MegatronBackend(resolved, seed=1).load_state_dict(saved)
    after = tensor_parallel.get_cuda_rng_tracker().get_states()
    assert sorted(after) == sorted(before) and all(after[k].numel() != 16 for k in after)
