"""The GRPO objective: each recipe field picks its registered variant, and the loss is hand-checkable."""

import typing

import pytest
import torch

from matrix.schema import GRPO
from trainer.algo import ADV_ESTIMATORS, AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES, ppo_clip_loss
from trainer.objective import advantages, make_loss_fn
from trainer.reward import GRADERS

BASE = {"prompts_per_episode": 1, "samples_per_prompt": 2, "max_prompt_len": 8, "max_response_len": 8}


def grpo(**fields) -> GRPO:
    return GRPO.model_validate(BASE | fields)


@pytest.mark.parametrize(("field", "registry"), [("advantage", ADV_ESTIMATORS), ("policy_loss", POLICY_LOSSES),
                                                 ("kl_estimator", KL_ESTIMATORS), ("loss_agg", AGG_MODES),
                                                 ("grader", GRADERS)])
def test_schema_names_are_the_registered_names(field, registry):
    """A recipe can select every registered variant, and only those (the matrix loads without torch)."""
    assert sorted(typing.get_args(GRPO.model_fields[field].annotation)) == registry.names()


def micro_batch():
    """Two rows; row 1 is shorter (padding at its end). Positions 0-1 are prompt, the rest response."""
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    return {"response_mask": mask,
            "old_logprobs": torch.full((2, 4), -1.0),
            "ref_logprobs": torch.full((2, 4), -1.5),
            "advantages": torch.tensor([1.0, -1.0])}


def test_default_loss_is_chatlearn_token_mean_by_hand():
    mb = micro_batch()
    logp = torch.full((2, 4), -1.0, requires_grad=True)  # on-policy: ratio 1, so pg = -A per token
    entropy = torch.full((2, 4), 0.5)
    g = grpo(kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = make_loss_fn(g, global_tokens=5)(logp, entropy, mb)
    k3 = torch.exp(torch.tensor(-0.5)) + 0.5 - 1  # d = ref - logp = -0.5
    pg = (3 * -1.0 + 2 * 1.0) / 5
    assert loss.item() == pytest.approx(pg + 0.1 * k3.item() - 0.01 * 0.5, rel=1e-6)
    assert metrics["loss/pg"] == pytest.approx(pg) and metrics["loss/kl"] == pytest.approx(k3.item(), rel=1e-6)
    loss.backward()
    assert logp.grad[:, 0].eq(0).all() and logp.grad[1, 3] == 0  # prompt and padding carry no gradient


@pytest.mark.parametrize(("fields", "expected"), [
    ({"kl_estimator": "k1", "kl_coef": 1.0}, 0.5),           # logp - ref
    ({"kl_estimator": "k2", "kl_coef": 1.0}, 0.125),         # (logp - ref)^2 / 2
    ({"loss_agg": "seq-mean-token-mean"}, (-1.0 + 1.0) / 2),  # mean of per-sequence means of pg = -A
])
def test_variant_fields_change_the_loss(fields, expected):
    mb = micro_batch()
    loss, metrics = make_loss_fn(grpo(**fields), 5)(torch.full((2, 4), -1.0), torch.zeros(2, 4), mb)
    pg = metrics["loss/pg"]
    assert (loss.item() - pg if "kl_coef" in fields else loss.item()) == pytest.approx(expected)


def test_seq_mean_is_split_independent():
    """The per-sequence mean divides by the episode's sequences, so micro-batches sum to the whole batch."""
    mb = micro_batch()
    logp = torch.linspace(-2.0, -0.5, 8).reshape(2, 4)
    loss_fn = make_loss_fn(grpo(loss_agg="seq-mean-token-mean"), 5)
    whole, _ = loss_fn(logp, torch.zeros(2, 4), mb)
    rows = [loss_fn(logp[i : i + 1], torch.zeros(1, 4), {k: v[i : i + 1] for k, v in mb.items()})[0] for i in (0, 1)]
    assert whole.item() == pytest.approx(sum(r.item() for r in rows))
    pg, _ = ppo_clip_loss(logp, mb["old_logprobs"], mb["advantages"])
    per_row = [pg[i].masked_select(mb["response_mask"][i].bool()).mean().item() for i in (0, 1)]
    assert whole.item() == pytest.approx(sum(per_row) / 2)  # 1 prompt × 2 samples


def test_policy_loss_field_selects_dual_clip():
    mb = micro_batch()
    mb["advantages"] = torch.tensor([-1.0, -1.0])
    logp = torch.full((2, 4), 1.5)  # ratio e^2.5 ~ 12: vanilla caps the loss at 3, dual clip bounds it at 3·|A|
    vanilla, _ = make_loss_fn(grpo(loss_cap=2.0), 5)(logp, torch.zeros(2, 4), mb)
    dual, m = make_loss_fn(grpo(policy_loss="dual_clip", dual_clip_c=4.0), 5)(logp, torch.zeros(2, 4), mb)
    assert vanilla.item() == pytest.approx(2.0) and dual.item() == pytest.approx(4.0)
    assert m["actor/pg_clipfrac_lower"] == pytest.approx(1.0)


def test_advantage_field_selects_the_estimator():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert advantages(grpo(), rewards)[0].item() == pytest.approx(0.5 / (0.5 + 1e-5))
    assert advantages(grpo(advantage="grpo_unbiased"), rewards)[0].item() == pytest.approx(
        0.5 / (2**-0.5 + 1e-6))


def test_loss_cap_with_dual_clip_is_refused():
    with pytest.raises(ValueError, match="loss_cap is an option of policy_loss vanilla"):
        grpo(policy_loss="dual_clip", loss_cap=5.0)
    assert grpo(policy_loss="dual_clip", loss_cap=None).loss_cap is None


@pytest.mark.parametrize("position", ["prompt", "padding", "response"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.001])
def test_reference_gap_of_100_nats_leaves_the_gradient_finite(matrix, groups, position, kl_coef):
    """MUST SHOW (issue 12.1): exp(100) overflows fp32; train_step must still see a finite grad norm."""
    from trainer.backends.megatron import MegatronBackend
    from trainer.batching import pack

    r = matrix.resolve("tiny-qwen2.5")
    g = r.recipe.grpo.model_copy(update={"kl_coef": kl_coef})
    policy = MegatronBackend(r, seed=0)
    batch = pack([[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12]], pad_id=0)
    batch["old_logprobs"] = policy.logprobs(batch, micro_batch_size=1)
    batch["ref_logprobs"] = batch["old_logprobs"].clone()
    batch["advantages"] = torch.tensor([1.0, -1.0])
    row, col = {"prompt": (0, 0), "padding": (1, 5), "response": (0, 3)}[position]
    assert batch["response_mask"][row, col] == (position == "response")
    batch["ref_logprobs"][row, col] += 100.0
    stats = policy.train_step(batch, lambda tokens: make_loss_fn(g, tokens), micro_batch_size=1)
    assert torch.isfinite(torch.tensor(stats["grad_norm"])) and stats["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in policy.model.parameters())


def test_k3_far_from_the_reference_is_clamped_with_a_finite_gradient():
    from trainer.algo import kl_k3

    logp = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    k3 = kl_k3(logp, logp.detach() + torch.tensor([100.0, -100.0, 0.0]))
    assert k3.tolist() == [10.0, 10.0, 0.0]
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()
