"""CurriculumManager: transitions change what is rewarded, resume exactly, overrides behave."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from curriculum.config import CurriculumConfig, PlateauConfig, StageConfig
from curriculum.manager import (
    METRIC_IMPROVEMENT,
    METRIC_NONFINITE_REWARDS_TOTAL,
    METRIC_OTHER_STAGE_REWARDS_TOTAL,
    METRIC_PLATEAU_STREAK,
    METRIC_SMOOTHED_REWARD,
    METRIC_STAGE,
    METRIC_STEPS_IN_STAGE,
    METRIC_TRANSITIONS_TOTAL,
    CurriculumManager,
)
from curriculum.plateau import REASON_MAX_STEPS, REASON_PLATEAU

RULE = PlateauConfig(window=5, delta=0.01, patience=3, min_steps=0, max_steps=1000)
WEIGHTS = [
    {"format": 1.0, "presence": 1.0},
    {"format": 1.0, "presence": 1.0, "category": 1.0},
    {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 2.0},
]


def config(rule: PlateauConfig = RULE, **overrides) -> CurriculumConfig:
    stages = [
        StageConfig(name=name, reward_weights=weights, advance=rule, difficulty_weights={"easy": 1.0})
        for name, weights in zip(["presence", "category", "iou"], WEIGHTS)
    ]
    return CurriculumConfig(stages=stages, **overrides)


def rise_then_flat(length: int) -> list[float]:
    """0.01 t up to t = 50, then flat: with RULE a stage fed this ends at its 59th step (see test_plateau)."""
    return [0.01 * min(t, 50) for t in range(1, length + 1)]


def test_weights_and_mix_change_at_the_transition(caplog):
    manager = CurriculumManager(config())
    trace = rise_then_flat(58)
    for step, reward in enumerate(trace, start=100):  # global steps 100..157
        assert manager.observe(step=step, stage_reward=reward) is None
        assert manager.reward_weights() == WEIGHTS[0]
    with caplog.at_level(logging.INFO, logger="curriculum.manager"):
        transition = manager.observe(step=158, stage_reward=0.5)
    assert transition is not None
    assert (transition.from_stage, transition.to_stage) == (0, 1)
    assert (transition.from_name, transition.to_name) == ("presence", "category")
    assert (transition.step, transition.steps_in_stage, transition.reason) == (158, 59, REASON_PLATEAU)
    assert transition.evidence["streak"] == 3
    assert manager.current_stage == 1
    assert manager.reward_weights() == WEIGHTS[1]
    assert manager.data_mix().difficulty_weights == {"easy": 1.0}
    assert "stage 0 (presence) -> 1 (category) at step 158" in caplog.text
    assert '"streak": 3' in caplog.text  # the evidence is in the log line
    metrics = manager.metrics()
    assert metrics[METRIC_STAGE] == 1.0
    assert metrics[METRIC_TRANSITIONS_TOTAL] == 1.0
    assert metrics[METRIC_STEPS_IN_STAGE] == 0.0
    assert math.isnan(metrics[METRIC_SMOOTHED_REWARD])  # new stage: no full window yet


def test_metrics_report_the_detector():
    manager = CurriculumManager(config())
    for step, reward in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], start=1):
        manager.observe(step=step, stage_reward=reward)
    metrics = manager.metrics()
    # s_5 = mean(1..5) = 3; s_10 = 5; improvement = 5 - 3 = 2 >= delta, so no streak.
    assert metrics[METRIC_SMOOTHED_REWARD] == 5.0
    assert metrics[METRIC_IMPROVEMENT] == 2.0
    assert metrics[METRIC_PLATEAU_STREAK] == 0.0
    assert metrics[METRIC_STEPS_IN_STAGE] == 10.0


def test_last_stage_never_advances_even_past_max_steps():
    rule = PlateauConfig(window=3, delta=0.01, patience=2, min_steps=0, max_steps=20)
    manager = CurriculumManager(config(rule, start_stage=2))
    assert manager.current_stage == 2
    assert manager.reward_weights() == WEIGHTS[2]
    for step in range(1, 200):  # flat: the rule says "plateau", then "max_steps"
        assert manager.observe(step=step, stage_reward=0.3) is None
    assert manager.current_stage == 2
    assert manager.metrics()[METRIC_TRANSITIONS_TOTAL] == 0.0
    assert manager.metrics()[METRIC_SMOOTHED_REWARD] == pytest.approx(0.3)


def test_max_steps_forces_a_transition():
    rule = PlateauConfig(window=3, delta=0.0, patience=1, min_steps=0, max_steps=25)
    manager = CurriculumManager(config(rule))
    transitions = [manager.observe(step=t, stage_reward=0.01 * t) for t in range(1, 26)]
    assert transitions[:-1] == [None] * 24
    assert transitions[-1].reason == REASON_MAX_STEPS
    assert manager.current_stage == 1


def test_force_advance_records_the_reason_and_stops_at_the_last_stage():
    manager = CurriculumManager(config())
    manager.observe(step=7, stage_reward=0.2)
    transition = manager.force_advance("operator saw format at 100%")
    assert transition.reason == "manual: operator saw format at 100%"
    assert (transition.to_stage, transition.step, transition.steps_in_stage) == (1, 7, 1)
    assert manager.reward_weights() == WEIGHTS[1]
    manager.force_advance("skip category")
    with pytest.raises(ValueError, match="last stage"):
        manager.force_advance("again")
    assert manager.current_stage == 2
    assert manager.metrics()[METRIC_TRANSITIONS_TOTAL] == 2.0


def test_state_dict_mid_run_continues_with_the_same_decisions():
    rule = PlateauConfig(smoothing="ema", window=8, delta=0.002, patience=6, min_steps=40, max_steps=400)
    noise = 0.02 * np.random.default_rng(3).standard_normal(900)

    def run(manager: CurriculumManager, steps: range) -> list:
        """Closed loop: each stage's reward restarts low and rises for 60 steps, then stays flat."""
        decisions = []
        for s in steps:
            in_stage = manager.metrics()[METRIC_STEPS_IN_STAGE]
            reward = 0.7 * min(in_stage / 60.0, 1.0) + noise[s]
            decisions.append(manager.observe(step=s, stage_reward=reward))
        return decisions

    whole = CurriculumManager(config(rule))
    expected = run(whole, range(0, 900))
    assert len(whole.transitions) == 2

    first = CurriculumManager(config(rule))
    got = run(first, range(0, 151))  # stops inside stage 1 (transitions at steps 94 and 188)
    assert len(first.transitions) == 1
    state = json.loads(json.dumps(first.state_dict()))  # as it would come back from a checkpoint
    second = CurriculumManager(config(rule))  # start_stage 0, overridden by the checkpoint
    second.load_state_dict(state)
    got += run(second, range(151, 900))

    assert got == expected
    assert second.state_dict() == whole.state_dict()
    assert second.metrics() == whole.metrics()


def test_state_of_other_stages_is_refused():
    manager = CurriculumManager(config())
    other = CurriculumManager(CurriculumConfig())  # default stages, other names
    with pytest.raises(ValueError, match="stages"):
        other.load_state_dict(manager.state_dict())


def test_bad_rewards_are_counted_and_dropped():
    manager = CurriculumManager(config())
    manager.observe(step=1, stage_reward=0.5)
    manager.observe(step=2, stage_reward=float("nan"))
    manager.observe(step=3, stage_reward=float("inf"))
    manager.observe(step=4, stage_reward=0.9, stage=1)  # earned under another stage's weights
    manager.observe(step=5, stage_reward=0.5, stage=0)
    metrics = manager.metrics()
    assert metrics[METRIC_STEPS_IN_STAGE] == 2.0
    assert metrics[METRIC_NONFINITE_REWARDS_TOTAL] == 2.0
    assert metrics[METRIC_OTHER_STAGE_REWARDS_TOTAL] == 1.0


def test_steps_must_increase():
    manager = CurriculumManager(config())
    manager.observe(step=3, stage_reward=0.5)
    with pytest.raises(ValueError, match="step must increase"):
        manager.observe(step=3, stage_reward=0.5)
