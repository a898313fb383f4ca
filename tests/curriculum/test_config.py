"""Curriculum configs: the paper's defaults, and invalid configs failing with the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from curriculum.config import (
    CurriculumConfig,
    PlateauConfig,
    SamplerConfig,
    StageConfig,
    default_stages,
)

GOOD_STAGE = {"name": "s", "reward_weights": {"format": 1.0}}


def test_default_stages_follow_the_paper():
    stages = default_stages()
    assert [set(stage.reward_weights) for stage in stages] == [
        {"format", "presence"},
        {"format", "presence", "category"},
        {"format", "presence", "category", "iou"},
    ]
    assert all(weight > 0 for stage in stages for weight in stage.reward_weights.values())
    # The share of hard prompts never falls from one stage to the next.
    hard = [stage.difficulty_weights["hard"] for stage in stages]
    assert hard == sorted(hard)
    config = CurriculumConfig()
    assert config.stages == stages
    assert config.start_stage == 0


def test_a_plateau_rule_that_can_fire_or_a_fixed_length_is_accepted():
    PlateauConfig(window=2, patience=1, min_steps=2, max_steps=4)  # the plateau at step 4 at the earliest
    PlateauConfig(window=2, patience=1, min_steps=3, max_steps=3)  # a stage of fixed length
    PlateauConfig(window=50, patience=20, min_steps=100, max_steps=119)


def test_config_round_trips_through_plain_data():
    config = CurriculumConfig(start_stage=1, sampler=SamplerConfig(seed=3, filter_solved=True))
    assert CurriculumConfig.model_validate(config.model_dump()) == config


def test_weights_summing_to_one_after_rounding_are_accepted_and_kept():
    stage = StageConfig(name="s", reward_weights={"iou": 1.0}, difficulty_weights={"easy": 0.7, "hard": 0.3})
    assert stage.difficulty_weights == {"easy": 0.7, "hard": 0.3}


def test_the_rewards_packages_custom_component_can_be_weighted():
    stage = StageConfig(name="s", reward_weights={"format": 1.0, "custom": 0.5})
    assert stage.reward_weights == {"format": 1.0, "custom": 0.5}


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (StageConfig, {**GOOD_STAGE, "reward_weights": {"format": 1.0, "accuracy": 1.0}}, "reward_weights"),
        (StageConfig, {**GOOD_STAGE, "reward_weights": {"format": 0.0, "iou": 0.0}}, "reward_weights"),
        (StageConfig, {**GOOD_STAGE, "reward_weights": {}}, "reward_weights"),
        (StageConfig, {**GOOD_STAGE, "reward_weights": {"format": -1.0}}, "reward_weights"),
        (StageConfig, {**GOOD_STAGE, "reward_weights": {"format": float("nan")}}, "reward_weights"),
        (StageConfig, {**GOOD_STAGE, "difficulty_weights": {"easy": 0.8, "hard": 0.1}}, "difficulty_weights"),
        (StageConfig, {**GOOD_STAGE, "difficulty_weights": {"easy": 0.5, "mid": 0.5}}, "difficulty_weights"),
        (StageConfig, {**GOOD_STAGE, "difficulty_weights": {}}, "difficulty_weights"),
        (StageConfig, {**GOOD_STAGE, "difficulty_weights": {"easy": 1.5, "hard": -0.5}}, "difficulty"),
        (StageConfig, {**GOOD_STAGE, "tasks": []}, "tasks"),
        (StageConfig, {**GOOD_STAGE, "tasks": ["camo", "camo"]}, "tasks"),
        (StageConfig, {**GOOD_STAGE, "tasks": ["segment"]}, "tasks"),
        (StageConfig, {**GOOD_STAGE, "name": ""}, "name"),
        (StageConfig, {**GOOD_STAGE, "reward_weight": {"iou": 1.0}}, "reward_weight"),
        (PlateauConfig, {"smoothing": "median"}, "smoothing"),
        (PlateauConfig, {"window": 1}, "window"),
        (PlateauConfig, {"delta": -0.1}, "delta"),
        (PlateauConfig, {"delta": float("inf")}, "delta"),
        (PlateauConfig, {"patience": 0}, "patience"),
        (PlateauConfig, {"min_steps": -1}, "min_steps"),
        (PlateauConfig, {"min_steps": 500, "max_steps": 499}, "max_steps"),
        # window 2, patience 1: the earliest plateau is step 4, so a stage of at most 3 steps never sees one.
        (PlateauConfig, {"window": 2, "patience": 1, "min_steps": 2, "max_steps": 3}, "at step 4 at the earliest"),
        (PlateauConfig, {"window": 50, "patience": 20, "min_steps": 100, "max_steps": 118}, "at step 119"),
        (PlateauConfig, {"patiense": 3}, "patiense"),
        (SamplerConfig, {"seed": -1}, "seed"),
        (SamplerConfig, {"history": 0}, "history"),
        (SamplerConfig, {"max_skips": 0}, "max_skips"),
        (SamplerConfig, {"solve_threshold": 0.5}, "solve_threshold"),  # gone: the filter needs no threshold
        (CurriculumConfig, {"start_stage": 3}, "start_stage"),
        (CurriculumConfig, {"start_stage": -1}, "start_stage"),
        (CurriculumConfig, {"stages": []}, "stages"),
        (CurriculumConfig, {"stages": [GOOD_STAGE, GOOD_STAGE]}, "stages"),
        (CurriculumConfig, {"stages": [{**GOOD_STAGE, "advance": {"window": 0}}]}, "window"),
        (CurriculumConfig, {"sampler": {"history": 0}}, "history"),
    ],
)
def test_invalid_config_names_the_field(model, data, field):
    with pytest.raises(ValidationError) as excinfo:
        model.model_validate(data)
    # Look at where each error points and what it says, not at the echoed input (which holds every key).
    named = [".".join(map(str, error["loc"])) + " " + error["msg"] for error in excinfo.value.errors()]
    assert any(field in text for text in named), named
