"""bench.learning's target check, on hand-made summaries (the benchmark itself runs for an hour)."""

from __future__ import annotations

import pytest

from bench.learning import target_check


def m(miou: float, presence: float, fmt: float = 1.0, rows: int = 250) -> dict:
    return {"miou": miou, "presence_accuracy": presence, "format_validity": fmt, "rows": rows}


def setting(rl_easy: dict, rl_hard: dict) -> dict:
    return {"sft": {"easy": m(0.5, 0.9), "hard": m(0.35, 0.8)},
            "sft_control": {"easy": m(0.5, 0.9), "hard": m(0.36, 0.8)},
            "rl": {"easy": rl_easy, "hard": rl_hard}}


def test_margin_is_over_the_better_of_sft_and_its_control():
    check = target_check(setting(m(0.6, 0.95), m(0.41, 0.92)))
    assert check["best_sft_hard_miou"] == 0.36
    assert check["margin"] == pytest.approx(0.05)
    assert check["met"] and check["met_pooled"]
    assert not target_check(setting(m(0.6, 0.95), m(0.40, 0.92)))["met"]  # margin 0.04


def test_presence_on_each_split_and_pooled():
    # easy 0.96 (250 rows), hard 0.86 (250 rows): the hard split misses 0.90, both together make 0.91.
    check = target_check(setting(m(0.6, 0.96), m(0.42, 0.86)))
    assert check["presence_accuracy_min"] == 0.86
    assert check["presence_accuracy_pooled"] == pytest.approx(0.91)
    assert not check["met"] and check["met_pooled"]
    # Pooled by rows: 100 easy rows at 0.96 and 300 hard at 0.86 -> (96 + 258) / 400 = 0.885.
    check = target_check(setting(m(0.6, 0.96, rows=100), m(0.42, 0.86, rows=300)))
    assert check["presence_accuracy_pooled"] == pytest.approx(0.885)
    assert not check["met_pooled"]


def test_format_validity_gates_both_readings():
    check = target_check(setting(m(0.6, 0.96), m(0.42, 0.95, fmt=0.97)))
    assert check["format_validity_min"] == 0.97
    assert not check["met"] and not check["met_pooled"]
