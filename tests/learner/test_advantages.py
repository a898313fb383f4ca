"""Group advantages, penalties and the zero-signal mask against hand-computed values."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from learner.advantages import apply_penalties, group_advantages, signal_mask  # noqa: E402

# Group 0: half right; group 1: all equal (no signal); group 2: one of four right with reward 2.
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 0.0, 0.0]]
EPS = 1e-4


def test_group_scale_uses_biased_std():
    adv = group_advantages(REWARDS)
    assert adv.dtype == torch.float32 and adv.shape == (3, 4)
    # group 0: mean 0.5, population std 0.5 -> +-0.5 / 0.5001 = +-0.99980
    a0 = 0.5 / (0.5 + EPS)
    # group 2: mean 0.5, deviations (1.5, -.5, -.5, -.5), var (2.25 + 3 * .25) / 4 = 0.75
    s2 = math.sqrt(0.75) + EPS
    expected = [[a0, -a0, -a0, a0], [0.0] * 4, [1.5 / s2, -0.5 / s2, -0.5 / s2, -0.5 / s2]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    assert adv[2, 0].item() == pytest.approx(1.7318508, rel=1e-6)


def test_batch_scale_divides_by_the_std_of_all_rewards():
    adv = group_advantages(REWARDS, scale="batch")
    # all 12 rewards: mean 0.5; squared deviations 4 * .25 + 0 + 2.25 + 3 * .25 = 4 -> var 4/12, std 0.5773503
    s = math.sqrt(1 / 3) + EPS
    expected = [[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], [0.0] * 4, [1.5 / s, -0.5 / s, -0.5 / s, -0.5 / s]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    assert adv[0, 0].item() == pytest.approx(0.8658754, rel=1e-6)


def test_none_scale_only_centres():
    adv = group_advantages(REWARDS, scale="none")
    expected = [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.5, -0.5, -0.5, -0.5]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))


def test_equal_rewards_give_exactly_zero_even_when_the_mean_rounds():
    # (0.1 + 0.1 + 0.1) / 3 == 0.10000000000000002 != 0.1 in float64: without care A would be ~2e-13.
    for scale in ("group", "batch", "none"):
        adv = group_advantages([[0.1, 0.1, 0.1], [0.0, 1.0, 0.0]], scale=scale)
        assert adv[0].tolist() == [0.0, 0.0, 0.0]


def test_single_sample_group_has_zero_advantage():
    assert group_advantages([[3.0]]).tolist() == [[0.0]]


def test_signal_mask_flags_groups_with_any_spread():
    assert signal_mask(REWARDS).tolist() == [True, False, True]
    assert signal_mask([[0.0, 0.05]], atol=0.1).tolist() == [False]  # spread 0.05 <= atol
    assert signal_mask([[0.0, 0.05]], atol=0.01).tolist() == [True]


def test_penalties_are_added_before_normalising():
    rewards = [[1.0, 1.0]]
    penalised = apply_penalties(rewards, [[-0.5, 0.0]])  # an overlong sample loses half its reward
    assert penalised.tolist() == [[0.5, 1.0]]
    assert signal_mask(rewards).tolist() == [False] and signal_mask(penalised).tolist() == [True]
    # mean 0.75, std 0.25 -> -+0.25 / 0.2501
    torch.testing.assert_close(group_advantages(penalised),
                               torch.tensor([[-0.25 / 0.2501, 0.25 / 0.2501]], dtype=torch.float32))


def test_accepts_tensors():
    adv = group_advantages(torch.tensor(REWARDS), scale="none")
    assert adv[2].tolist() == [1.5, -0.5, -0.5, -0.5]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: group_advantages(REWARDS, scale="rank"), "scale"),
        (lambda: group_advantages(REWARDS, eps=0.0), "eps"),
        (lambda: group_advantages([1.0, 2.0]), "rewards"),
        (lambda: signal_mask(REWARDS, atol=-1.0), "atol"),
        (lambda: apply_penalties(REWARDS, [[0.0]]), "penalties"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
