"""GRPO advantages against hand-computed numbers and a loop reference; the registry contract."""

import statistics

import pytest
import torch

from trainer.algo import advantages as adv
from trainer.algo.registry import Registry, UnknownVariantError


def test_chatlearn_hand_computed():
    # mean 0.5, population std 0.5 -> A = +-0.5 / (0.5 + 1e-5)
    a = adv.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    expected = 0.5 / (0.5 + 1e-5)
    torch.testing.assert_close(a, torch.tensor([expected, -expected, -expected, expected]))


def test_unbiased_hand_computed():
    # ddof 1: std = sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = adv.grpo_unbiased_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    expected = 0.5 / ((1 / 3) ** 0.5 + 1e-6)
    torch.testing.assert_close(a, torch.tensor([expected, -expected, -expected, expected]))


def test_all_equal_groups_give_zero_and_shape_is_kept():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    a = adv.grpo_advantages(r)
    assert a.shape == (3, 3)
    assert torch.equal(a[:2], torch.zeros(2, 3))
    # third group: mean 1, population std sqrt(2/3)
    s = (2 / 3) ** 0.5 + 1e-5
    torch.testing.assert_close(a[2], torch.tensor([1 / s, -1 / s, 0.0]))


def test_singleton_groups():
    r = torch.tensor([0.7, 0.2])
    assert torch.equal(adv.grpo_advantages(r, group_size=1), torch.zeros(2))  # ChatLearn: std 0 -> A 0
    # verl: mean 0, std 1 -> A = r / (1 + 1e-6)
    torch.testing.assert_close(adv.grpo_unbiased_advantages(r, group_size=1), r / (1 + 1e-6))


@pytest.mark.parametrize("seed,n_groups,n", [(0, 3, 4), (1, 5, 8), (2, 1, 2)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_vectorised_matches_loop(seed, n_groups, n, unbiased):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n_groups * n,), generator=g).double()
    fn = adv.grpo_unbiased_advantages if unbiased else adv.grpo_advantages
    got = fn(r, group_size=n)
    expected = []
    for i in range(n_groups):
        grp = r[i * n : (i + 1) * n].tolist()
        std = statistics.stdev(grp) if unbiased else statistics.pstdev(grp)
        eps = 1e-6 if unbiased else 1e-5
        expected += [(x - statistics.mean(grp)) / (std + eps) for x in grp]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_outcome_ratios():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    assert adv.group_outcome_ratios(r, group_size=2) == {"all_correct_ratio": 0.5, "all_wrong_ratio": 0.25}


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="group_size"):
        adv.grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        adv.grpo_advantages(torch.zeros(6))
    with pytest.raises(ValueError, match="group_size=3"):
        adv.grpo_advantages(torch.zeros(2, 4), group_size=3)


def test_registry_lookup_lists_names_and_rejects_duplicates():
    assert adv.get_adv_estimator("grpo") is adv.grpo_advantages
    assert adv.get_adv_estimator("grpo_unbiased") is adv.grpo_unbiased_advantages
    with pytest.raises(UnknownVariantError, match=r"'GRPO'.*\['grpo', 'grpo_unbiased'\]"):
        adv.get_adv_estimator("GRPO")  # names are case-sensitive
    with pytest.raises(ValueError, match="already registered"):
        adv.register_adv_estimator("grpo")(lambda rewards, group_size=None: rewards)
    adv.register_adv_estimator("grpo")(adv.grpo_advantages)  # same function again: no-op


def test_registry_names_and_contains():
    reg = Registry("thing")
    reg.register("b")(len)
    reg.register("a")(abs)
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg
    with pytest.raises(ValueError):
        reg.register("")
