"""Skipped passes (trainer.passes): decided from the recipe, and they change no number where they are skipped."""

import pytest
import torch

from trainer.metrics import StageTimer
from trainer.passes import Passes, passes


def recipe(matrix, name="demo", **grpo):
    r = matrix.resolve(name)
    return r.model_copy(update={"recipe": r.recipe.model_copy(update={"grpo": r.recipe.grpo.model_copy(update=grpo)})})


# ------------------------------------------------------------------ the decision


@pytest.mark.parametrize(("grpo", "expected"), [
    ({}, Passes(old_logprobs=False, reference=False)),                       # the demo: kl_coef 0, one step
    ({"kl_coef": 0.01}, Passes(old_logprobs=False, reference=True)),         # KL in the loss needs the reference
    ({"log_reference_kl": True}, Passes(old_logprobs=False, reference=True)),  # asked to log the KL
    ({"steps_per_episode": 2}, Passes(old_logprobs=True, reference=False)),  # the policy moves between steps
    ({"steps_per_episode": 2, "kl_coef": 0.001}, Passes(old_logprobs=True, reference=True)),
])
def test_passes_follow_the_recipe(matrix, grpo, expected):
    assert passes(recipe(matrix, **grpo)) == expected


def test_dropout_keeps_the_old_logprob_pass(matrix, monkeypatch):
    """Two forwards with dropout differ, so the training forward's log-probs are not the sampling policy's."""
    import dataclasses

    from trainer.models import families

    real = families.family("qwen2")
    dropout = dataclasses.replace(real, transformer_config=lambda model, layout: dataclasses.replace(
        real.transformer_config(model, layout), hidden_dropout=0.1))
    monkeypatch.setattr(families, "family", lambda name: dropout)
    assert passes(recipe(matrix)).old_logprobs


def test_fsdp_trainer_asks_its_own_model_whether_the_forward_is_stochastic(matrix, monkeypatch):
    """The FSDP2 backend reads transformers' config: no dropout → the pass is skipped; attention dropout → kept."""
    import dataclasses

    from trainer.models import families

    r = recipe(matrix)
    fsdp = r.model_copy(update={"recipe": r.recipe.model_copy(update={"trainer": "fsdp"})})
    assert not passes(fsdp).old_logprobs
    real = families.family("qwen2")

    def with_dropout(model):
        config = real.hf_config(model)
        config.attention_dropout = 0.1
        return config

    from trainer.backends import fsdp as fsdp_backend

    monkeypatch.setattr(fsdp_backend, "family", lambda name: dataclasses.replace(real, hf_config=with_dropout))
    assert passes(fsdp).old_logprobs


def test_log_reference_kl_false_with_kl_in_the_loss_is_refused():
    from pydantic import ValidationError

    from matrix.schema import GRPO

    base = {"prompts_per_episode": 1, "samples_per_prompt": 2, "max_prompt_len": 8, "max_response_len": 8}
    with pytest.raises(ValidationError, match="kl_coef 0.01 puts the KL in the loss"):
        GRPO.model_validate(base | {"kl_coef": 0.01, "log_reference_kl": False})
    assert GRPO.model_validate(base | {"log_reference_kl": False}).log_reference_kl is False


# ------------------------------------------------------------------ learn runs exactly the passes decided


class Spy:
    """A backend that records what the loop asks of it (no model)."""

    def __init__(self):
        self.calls = []

    def logprobs(self, batch, *, micro_batch_size):
        self.calls.append("logprobs")
        return torch.zeros(batch["response_mask"].shape)

    def train_step(self, batch, make_loss, *, micro_batch_size, return_logprobs=False):
        self.calls.append(("train_step", return_logprobs, "old_logprobs" in batch, "ref_logprobs" in batch))
        stats = {"loss": 0.0}
        return (stats, torch.ones(batch["response_mask"].shape)) if return_logprobs else stats


def spy_batch():
    return {"input_ids": torch.ones(2, 5, dtype=torch.long), "response_mask": torch.ones(2, 4)}


@pytest.mark.parametrize(("grpo", "policy_calls", "ref_calls"), [
    ({}, [("train_step", True, False, False)], None),
    ({"kl_coef": 0.01}, [("train_step", True, False, True)], ["logprobs"]),
    ({"steps_per_episode": 2}, ["logprobs"] + 2 * [("train_step", False, True, False)], None),
    ({"steps_per_episode": 2, "kl_coef": 0.01}, ["logprobs"] + 2 * [("train_step", False, True, True)], ["logprobs"]),
])
def test_learn_runs_the_passes_the_recipe_needs(matrix, grpo, policy_calls, ref_calls):
    from trainer.episode import learn

    r = recipe(matrix, **grpo)
    policy, ref = Spy(), (Spy() if ref_calls else None)
    batch, timer = spy_batch(), StageTimer()
    learn(batch, r, policy, ref, timer)
    assert policy.calls == policy_calls
    assert (ref.calls if ref else None) == ref_calls
    # the old log-probs are in the batch either way (mismatch metrics, gates): the separate pass's or the forward's
    assert torch.equal(batch["old_logprobs"], torch.zeros(2, 4) if "logprobs" in policy_calls else torch.ones(2, 4))
    assert (timer.seconds["old_logprob"] > 0) == ("logprobs" in policy_calls)
    assert (timer.seconds["ref_logprob"] > 0) == bool(ref_calls)


# ------------------------------------------------------------------ the skipped pass changes no number


def one_step(r, mb, need, *, seed=0):
    """Loss, grad norm, gradients, old log-probs and weights after one GRPO step of a fresh backend."""
    from trainer.backends.megatron import MegatronBackend
    from trainer.objective import make_loss_fn

    be = MegatronBackend(r, seed=seed)
    grads = []  # the clipped gradient the optimizer is about to apply
    be.optimizer.register_step_pre_hook(lambda *_: grads.append([p.grad.clone() for p in be.model.parameters()]))
    batch = {k: v.clone() for k, v in mb.items()}
    make_loss = lambda tokens: make_loss_fn(r.recipe.grpo, tokens, need)  # noqa: E731
    if need.old_logprobs:
        batch["old_logprobs"] = be.logprobs(batch, micro_batch_size=2)
        stats = be.train_step(batch, make_loss, micro_batch_size=2)
    else:
        stats, batch["old_logprobs"] = be.train_step(batch, make_loss, micro_batch_size=2, return_logprobs=True)
    return stats, grads[0], batch["old_logprobs"], [p.detach().clone() for p in be.model.parameters()]


def grpo_batch():
    from trainer.batching import pack

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 6)]
    responses = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (6, 1, 4, 5, 3)]
    batch = pack(prompts, responses, pad_id=0)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5])
    return batch


@pytest.mark.parametrize("grpo", [{}, {"loss_agg": "seq-mean-token-mean", "policy_loss": "dual_clip",
                                       "loss_cap": None}])
def test_training_forward_old_logprobs_give_the_separate_pass_loss_and_gradient(matrix, groups, grpo):
    """MUST SHOW (issue 9.4a): same weights, same batch: the same loss, gradient, old log-probs and update."""
    r = recipe(matrix, "tiny-qwen2.5", prompts_per_episode=5, samples_per_prompt=1, **grpo)
    mb = grpo_batch()
    s_sep, g_sep, old_sep, w_sep = one_step(r, mb, Passes(old_logprobs=True, reference=False))
    s_fwd, g_fwd, old_fwd, w_fwd = one_step(r, mb, Passes(old_logprobs=False, reference=False))
    keep = mb["response_mask"].bool()
    torch.testing.assert_close(old_fwd[keep], old_sep[keep], rtol=0, atol=1e-6)
    assert s_fwd["loss"] == pytest.approx(s_sep["loss"], rel=1e-6, abs=1e-9)
    assert s_fwd["grad_norm"] == pytest.approx(s_sep["grad_norm"], rel=1e-5)
    assert s_fwd["grad_norm"] > 0 and s_fwd["actor/ppo_kl"] == 0.0  # ratio exactly 1: log-ratio 0 everywhere
    for a, b in zip(g_fwd, g_sep, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    for a, b in zip(w_fwd, w_sep, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_stale_old_logprob_would_change_the_gradient(matrix, groups):
    """The comparison above can fail: old log-probs off by 0.3 (a wrong pass) move the gradient."""
    from trainer.backends.megatron import MegatronBackend
    from trainer.objective import make_loss_fn

    r = recipe(matrix, "tiny-qwen2.5", prompts_per_episode=5, samples_per_prompt=1)
    mb = grpo_batch()
    norms = []
    for shift in (0.0, 0.3):
        be = MegatronBackend(r, seed=0)
        batch = {k: v.clone() for k, v in mb.items()}
        batch["old_logprobs"] = be.logprobs(batch, micro_batch_size=2) + shift
        make_loss = lambda t: make_loss_fn(r.recipe.grpo, t, Passes(reference=False))  # noqa: E731
        norms.append(be.train_step(batch, make_loss, micro_batch_size=2)["grad_norm"])
    assert norms[1] != pytest.approx(norms[0], rel=1e-3)


def reward_curve(r, task, initial, need, episodes):
    """Rewards per episode of ``episodes`` GRPO episodes from ``initial`` weights, running the passes ``need``."""
    from trainer.backends.base import build_backend
    from trainer.episode import collect, learn
    from trainer.rollout.factory import build_engine

    policy = build_backend(r, seed=r.recipe.run.seed, initial=initial)
    ref = build_backend(r, seed=r.recipe.run.seed, trainable=False, initial=initial) if need.reference else None
    engine = build_engine(r, task)
    curve = []
    for episode in range(1, episodes + 1):
        engine.update_weights(policy.hf_named_tensors())
        collected = collect(episode, r, task, engine)
        learn(collected.batch, r, policy, ref, StageTimer(), need)
        curve.append(collected.rewards.mean().item())
    return curve


@pytest.mark.slow  # a 60-step warm start and 2 × 6 demo episodes: ~40 s on 2 idle cores
def test_same_seed_gives_the_same_reward_curve_without_the_skipped_passes(matrix, groups):
    """MUST SHOW (issue 9.4b): the demo's learning with both passes and with neither, from the same warm start."""
    from pathlib import Path

    from trainer.backends.base import build_backend
    from trainer.tasks import build_task
    from trainer.warmstart import warm_start

    r = matrix.resolve("demo")
    r = r.model_copy(update={"recipe": r.recipe.model_copy(update={
        "run": r.recipe.run.model_copy(update={"warm_start_steps": 60})})})
    torch.manual_seed(r.recipe.run.seed)
    task = build_task(r, root=Path("."))
    policy = build_backend(r, seed=r.recipe.run.seed)
    warm_start(policy, task, r, show=False)
    initial = dict(policy.hf_named_tensors())
    assert passes(r) == Passes(old_logprobs=False, reference=False)
    both = reward_curve(r, task, initial, Passes(old_logprobs=True, reference=True), 6)
    skipped = reward_curve(r, task, initial, passes(r), 6)
    assert 0 < sum(both) / len(both) < 1  # rewards vary, so the curve can tell two policies apart
    assert skipped == pytest.approx(both, abs=3 / 128)  # at most 3 of 128 samples apart per episode
