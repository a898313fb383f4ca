"""bench.presence_ranking's figures on a hand-computed split (the forward pass is the model's own)."""

import pytest

from bench.presence_ranking import mixed_group_probability, ranking, row_groups


def test_ranking_hand_computed():
    # P("none") of 6 images; the last three hold no animal.
    p_none = [0.1, 0.6, 0.3, 0.6, 0.9, 0.4]
    absent = [False, False, False, True, True, True]
    got = ranking(p_none, absent)
    # Pairs (no animal vs animal 0.1, 0.6, 0.3): 0.6 -> 1 + 0.5 (tie) + 1; 0.9 -> 3; 0.4 -> 1 + 0 + 1. AUC 7.5 / 9.
    assert got["auc"] == pytest.approx(7.5 / 9)
    assert got["accuracy_at_half"] == pytest.approx(4 / 6)  # wrong: the animal at 0.6, the empty image at 0.4
    assert got["miss_rate"] == pytest.approx(1 / 3)  # the animal at 0.6, of three animals
    assert got["false_alarm_rate"] == pytest.approx(1 / 3)  # the empty image at 0.4, of three
    assert got["best_threshold_accuracy"] == pytest.approx(5 / 6)  # "none" iff p > 0.3
    assert got["majority_accuracy"] == pytest.approx(0.5)
    assert (got["rows"], got["absent"]) == (6, 3)


def test_ranking_without_both_classes_has_no_auc():
    got = ranking([0.2, 0.6], [False, False])
    assert got["auc"] is None and got["false_alarm_rate"] is None
    assert got["miss_rate"] == pytest.approx(0.5)


def test_errors_by_class_when_the_classes_are_unbalanced():
    # Four animals (one called "none") and one empty image called "present": misses 1/4, false alarms 1/1.
    got = ranking([0.1, 0.2, 0.7, 0.3, 0.2], [False, False, False, False, True])
    assert (got["miss_rate"], got["false_alarm_rate"]) == (pytest.approx(0.25), pytest.approx(1.0))


def test_mixed_group_probability_hand_computed():
    # A coin at T = 1: 8 samples agree with probability 2 * 0.5^8, so 1 - 1/128 are mixed.
    assert mixed_group_probability(0.5, samples=8, temperature=1.0) == pytest.approx(1 - 1 / 128)
    # P("none") 0.9, two samples at T = 1: mixed 1 - 0.81 - 0.01 = 0.18.
    assert mixed_group_probability(0.9, samples=2, temperature=1.0) == pytest.approx(0.18)
    # At T = 0.5 the odds square: q = 0.81 / 0.82, so mixed = 1 - q^2 - (1 - q)^2 = 2 * 0.81 * 0.01 / 0.82^2.
    assert mixed_group_probability(0.9, samples=2, temperature=0.5) == pytest.approx(2 * 0.81 * 0.01 / 0.82**2)


def test_mixed_groups_are_reported_over_all_rows_and_over_the_errors():
    # Two confident right verdicts and one wrong at 0.6 (an animal the greedy verdict calls "none").
    got = ranking([0.01, 0.99, 0.6], [False, True, False], samples=2, temperature=1.0)
    assert got["mixed_groups_of_errors"] == pytest.approx(2 * 0.6 * 0.4)
    assert got["mixed_groups"] == pytest.approx((2 * 0.01 * 0.99 * 2 + 2 * 0.6 * 0.4) / 3)
    assert ranking([0.1, 0.9], [False, True])["mixed_groups_of_errors"] is None  # no error to flip


def test_row_groups_split_by_difficulty_only_where_a_split_mixes_them():
    train = [{"difficulty": d} for d in ("hard", "easy", "hard")]
    assert row_groups("train", train, True) == {"train": [0, 1, 2], "train/easy": [1], "train/hard": [0, 2]}
    assert row_groups("train", train, False) == {"train": [0, 1, 2]}
    assert row_groups("test_hard", [{"difficulty": "hard"}] * 2, True) == {"test_hard": [0, 1]}
