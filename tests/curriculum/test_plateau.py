"""PlateauDetector on synthetic reward traces: hand-computed steps, many noisy seeds, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curriculum.config import PlateauConfig
from curriculum.plateau import REASON_MAX_STEPS, REASON_PLATEAU, PlateauDetector


def first_decision(detector: PlateauDetector, trace) -> tuple[int | None, str | None]:
    """Feed the trace; return (1-based step, reason) of the first advance, or (None, None)."""
    for step, reward in enumerate(trace, start=1):
        reason = detector.update(float(reward))
        if reason is not None:
            return step, reason
    return None, None


def reference_first_plateau(trace: np.ndarray, cfg: PlateauConfig) -> int | None:
    """The documented rule written independently (vectorised smoothing, cumulative-max baseline)."""
    w = cfg.window
    if cfg.smoothing == "ma":
        smoothed = np.convolve(trace, np.ones(w) / w, mode="valid")  # smoothed[j] is step j + w
    else:
        alpha = 2.0 / (w + 1)
        smoothed = np.empty(len(trace) - w + 1)
        smoothed[0] = trace[:w].mean()
        for j in range(1, len(smoothed)):
            smoothed[j] = smoothed[j - 1] + alpha * (trace[j + w - 1] - smoothed[j - 1])
    best_so_far = np.maximum.accumulate(smoothed)
    streak = 0
    for t in range(2 * w, len(trace) + 1):
        improvement = smoothed[t - w] - best_so_far[t - 2 * w]  # baseline: best s_u, u <= t - w
        streak = streak + 1 if improvement <= cfg.delta else 0
        if streak >= cfg.patience and t >= cfg.min_steps:
            return t
    return None


def test_clean_rise_then_flat_advances_at_hand_computed_step():
    # r_t = 0.01 t up to t = 50, then flat at 0.5 (flat from step 51 on).
    # MA over 5: s_t = 0.01 (t - 2) for t <= 50; s_51..54 = 0.488, 0.494, 0.498, 0.5; then 0.5.
    # improvement i_t = s_t - s_{t-5} (s rises monotonically, so the best earlier value is s_{t-5}):
    # i_56 = 0.5 - 0.488 = 0.012 >= delta; i_57 = 0.006, i_58 = 0.002, i_59 = 0.0 < delta = 0.01,
    # so the third consecutive low step (patience 3) is step 59.
    cfg = PlateauConfig(window=5, delta=0.01, patience=3, min_steps=0, max_steps=1000)
    trace = [0.01 * min(t, 50) for t in range(1, 200)]
    detector = PlateauDetector(cfg)
    step, reason = first_decision(detector, trace)
    assert (step, reason) == (59, REASON_PLATEAU)
    flat_start = 51
    # The smoothing lag bounds the delay after the flat part begins: at most 2 windows + patience.
    assert flat_start <= step <= flat_start + 2 * cfg.window + cfg.patience
    evidence = detector.evidence()
    assert evidence["decision"] == REASON_PLATEAU
    assert evidence["streak"] == 3
    assert evidence["baseline_step"] == 54
    assert evidence["streak_max_improvement"] == pytest.approx(0.006)
    assert [r["improvement"] for r in evidence["recent"][-4:]] == pytest.approx([0.012, 0.006, 0.002, 0.0])
    assert json.loads(json.dumps(evidence)) == evidence


def test_delta_zero_still_ends_a_flat_stage():
    # A saturated stage feeds the same reward every step: i_t = 0 from t = 2w on. delta 0 means "any rise
    # counts", not "the stage never plateaus": the streak starts at t = 2w = 8 and reaches patience 3 at t = 10.
    cfg = PlateauConfig(window=4, delta=0.0, patience=3, min_steps=0, max_steps=100)
    assert first_decision(PlateauDetector(cfg), [1.0] * 100) == (10, REASON_PLATEAU)
    # ... while a rise, however small, resets the streak.
    assert first_decision(PlateauDetector(cfg), [1e-6 * t for t in range(1, 101)]) == (100, REASON_MAX_STEPS)


@pytest.mark.parametrize(
    ("min_steps", "expected_step"),
    [
        # Step trace: 0 up to t = 20, then 1. MA over 4: s = 0, then 0.25, 0.5, 0.75 at t = 21..23, then 1.
        # From t = 8 the improvement is 0 (< 0.1): a flat start is a plateau, so with min_steps 15 the
        # streak (already >= 2) ends the stage exactly at step 15.
        (15, 15),
        # With min_steps 21 the rise at t = 21 (i = 0.25) resets the streak first; then
        # i_25..28 = 1 - s_21.. = 0.75, 0.5, 0.25, 0.0, so the streak reaches 2 at step 29.
        (21, 29),
    ],
)
def test_min_steps_is_a_floor_and_a_rise_resets_the_streak(min_steps, expected_step):
    cfg = PlateauConfig(window=4, delta=0.1, patience=2, min_steps=min_steps, max_steps=1000)
    trace = [0.0] * 20 + [1.0] * 40
    assert first_decision(PlateauDetector(cfg), trace) == (expected_step, REASON_PLATEAU)


@pytest.mark.parametrize(("min_steps", "expected_step"), [(100, 119), (150, 150)])
def test_a_flat_stage_ends_at_min_steps_or_when_a_streak_can_first_reach_patience(min_steps, expected_step):
    # Defaults w = 50, patience = 20: the improvement exists from t = 100, so a constant reward's streak
    # reaches 20 at t = 119; min_steps only holds the stage longer than that.
    cfg = PlateauConfig(min_steps=min_steps)
    assert (cfg.window, cfg.patience) == (50, 20)
    assert first_decision(PlateauDetector(cfg), [0.5] * 300) == (expected_step, REASON_PLATEAU)


@pytest.mark.parametrize("smoothing", ["ma", "ema"])
@pytest.mark.parametrize("min_steps", [0, 120])
def test_noisy_flat_trace_advances_exactly_by_the_rule(smoothing, min_steps):
    cfg = PlateauConfig(
        smoothing=smoothing, window=20, delta=0.005, patience=15, min_steps=min_steps, max_steps=2000
    )
    steps = []
    for seed in range(100):
        trace = 0.6 + 0.1 * np.random.default_rng(seed).standard_normal(600)  # zero trend, sd 0.1
        expected = reference_first_plateau(trace, cfg)
        step, reason = first_decision(PlateauDetector(cfg), trace)
        assert expected is not None, f"seed {seed}: flat trace never judged flat"
        assert (step, reason) == (expected, REASON_PLATEAU), f"seed {seed}"
        assert step >= max(min_steps, 2 * cfg.window + cfg.patience - 1)
        steps.append(step)
    if min_steps == 0:
        # Not all seeds end at the earliest possible step: noise does reset streaks, and the rule
        # (not luck) decides when the stage ends.
        assert len(set(steps)) > 1


@pytest.mark.parametrize("smoothing", ["ma", "ema"])
def test_still_rising_noisy_trace_runs_to_max_steps(smoothing):
    # Rises 0.06 per window of 30 (six times delta); noise sd 0.05 per step.
    cfg = PlateauConfig(smoothing=smoothing, window=30, delta=0.01, patience=10, min_steps=50, max_steps=400)
    for seed in range(50):
        t = np.arange(1, 1001)
        trace = 0.1 + 0.002 * t + 0.05 * np.random.default_rng(seed).standard_normal(t.size)
        assert first_decision(PlateauDetector(cfg), trace) == (400, REASON_MAX_STEPS), f"seed {seed}"


def test_max_steps_forces_an_advance_and_says_so():
    cfg = PlateauConfig(window=3, delta=0.0, patience=1, min_steps=0, max_steps=30)
    detector = PlateauDetector(cfg)
    assert first_decision(detector, [0.01 * t for t in range(1, 100)]) == (30, REASON_MAX_STEPS)
    assert detector.evidence()["decision"] == REASON_MAX_STEPS
    assert detector.evidence()["streak"] == 0


@pytest.mark.parametrize("smoothing", ["ma", "ema"])
def test_state_dict_round_trip_continues_identically(smoothing):
    cfg = PlateauConfig(smoothing=smoothing, window=10, delta=0.002, patience=8, min_steps=0, max_steps=5000)
    trace = np.concatenate([np.linspace(0.0, 0.8, 150), np.full(250, 0.8)])
    trace = trace + 0.03 * np.random.default_rng(7).standard_normal(trace.size)

    whole = PlateauDetector(cfg)
    whole_decisions = [whole.update(float(r)) for r in trace]

    first = PlateauDetector(cfg)
    resumed_decisions = [first.update(float(r)) for r in trace[:173]]
    state = json.loads(json.dumps(first.state_dict()))  # as it would come back from a checkpoint
    second = PlateauDetector(cfg)
    second.load_state_dict(state)
    resumed_decisions += [second.update(float(r)) for r in trace[173:]]

    assert resumed_decisions == whole_decisions
    assert REASON_PLATEAU in whole_decisions
    assert second.state_dict() == whole.state_dict()
    assert second.evidence() == whole.evidence()


def test_state_from_another_rule_is_refused_naming_the_field():
    detector = PlateauDetector(PlateauConfig(window=10))
    detector.update(0.5)
    other = PlateauDetector(PlateauConfig(window=10, patience=99))
    with pytest.raises(ValueError, match="patience"):
        other.load_state_dict(detector.state_dict())


def test_smoothed_and_improvement_appear_after_one_and_two_windows():
    detector = PlateauDetector(PlateauConfig(window=4, min_steps=0))
    for reward in [1.0, 2.0, 3.0]:
        detector.update(reward)
    assert detector.smoothed is None
    detector.update(6.0)
    assert detector.smoothed == 3.0  # (1 + 2 + 3 + 6) / 4
    for reward in [2.0, 2.0, 2.0]:
        detector.update(reward)
    assert detector.improvement is None  # 7 steps < 2 windows
    detector.update(2.0)
    assert detector.smoothed == 2.0
    assert detector.improvement == -1.0  # s_8 - s_4 = 2 - 3


def test_ema_follows_its_recurrence():
    detector = PlateauDetector(PlateauConfig(smoothing="ema", window=3, min_steps=0))
    for reward in [1.0, 2.0, 3.0]:
        detector.update(reward)
    assert detector.smoothed == 2.0  # seeded by the first window's mean
    detector.update(4.0)
    assert detector.smoothed == 3.0  # 2 + (2 / 4) * (4 - 2)


def test_non_finite_reward_is_rejected():
    detector = PlateauDetector(PlateauConfig())
    with pytest.raises(ValueError, match="finite"):
        detector.update(float("nan"))
    assert detector.steps == 0
