"""bench.presence_ranking's figures on a hand-computed split (the forward pass is the model's own)."""

import pytest

from bench.presence_ranking import ranking


def test_ranking_hand_computed():
    # P("none") of 6 images; the last three hold no animal.
    p_none = [0.1, 0.6, 0.3, 0.6, 0.9, 0.4]
    absent = [False, False, False, True, True, True]
    got = ranking(p_none, absent)
    # Pairs (no animal vs animal 0.1, 0.6, 0.3): 0.6 -> 1 + 0.5 (tie) + 1; 0.9 -> 3; 0.4 -> 1 + 0 + 1. AUC 7.5 / 9.
    assert got["auc"] == pytest.approx(7.5 / 9)
    assert got["accuracy_at_half"] == pytest.approx(4 / 6)  # wrong: the animal at 0.6, the empty image at 0.4
    assert got["best_threshold_accuracy"] == pytest.approx(5 / 6)  # "none" iff p > 0.3
    assert got["majority_accuracy"] == pytest.approx(0.5)
    assert (got["rows"], got["absent"]) == (6, 3)


def test_ranking_without_both_classes_has_no_auc():
    assert ranking([0.2, 0.4], [False, False])["auc"] is None
