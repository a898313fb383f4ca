"""Configuration of the curriculum: reward stages, their plateau rule and the prompt sampler.

A stage says which reward components count (and how much), which prompts are drawn (task filter and
difficulty weights) and when to move on (a plateau rule). The default reproduces Visual Refocus'
three stages: format + presence, then + category, then + IoU.

Difficulty moves easy -> hard stage by stage (each stage has fixed difficulty weights) rather than
with a per-step schedule: the stage is already the unit at which the task gets harder, and a fixed
mix keeps a stage's reward trace stationary, which the plateau detector relies on.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Shared contract: reward component names (rewards, curriculum and metrics use the same strings).
# "custom" is the optional user reward of the rewards package; a stage may weight it like any other.
COMPONENT_NAMES = ("format", "presence", "category", "iou", "confidence", "overlong", "custom")
# Shared contract: data set row values of `task` and `difficulty`.
TASKS = ("camo", "classify", "detect", "ground")
DIFFICULTIES = ("easy", "hard")

Task = Literal["camo", "classify", "detect", "ground"]
Difficulty = Literal["easy", "hard"]

# Difficulty weights must sum to 1; this only absorbs decimal rounding (0.7 + 0.2 + 0.1 in floats).
_WEIGHT_SUM_TOLERANCE = 1e-9

Weight = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class PlateauConfig(BaseModel):
    """When a stage stops improving. See curriculum/plateau.py for the exact rule."""

    model_config = ConfigDict(extra="forbid")

    smoothing: Literal["ma", "ema"] = Field(
        "ma", description="Trend of the stage reward: moving average or exponential moving average."
    )
    window: int = Field(
        50, ge=2, le=100_000, description="Steps in the moving average (EMA: alpha = 2 / (window + 1))."
    )
    delta: float = Field(
        0.01,
        ge=0.0,
        le=1e6,
        allow_inf_nan=False,
        description="A gain of the smoothed reward over its best value a window ago counts only above this "
        "(0: any rise counts; a flat reward never does).",
    )
    patience: int = Field(
        20, ge=1, le=100_000, description="Consecutive steps without such a gain before advancing."
    )
    min_steps: int = Field(
        100, ge=0, le=10_000_000, description="Steps a stage always runs before a plateau can end it."
    )
    max_steps: int = Field(
        2000, ge=1, le=10_000_000, description="Safety stop: steps after which the stage ends anyway."
    )

    @model_validator(mode="after")
    def _check_step_bounds(self) -> PlateauConfig:
        if self.max_steps < self.min_steps:
            raise ValueError(
                f"max_steps ({self.max_steps}) must be >= min_steps ({self.min_steps})"
            )
        # The improvement exists from step 2w, so the earliest plateau is step 2w + patience - 1 (plateau.py).
        earliest = max(self.min_steps, 2 * self.window + self.patience - 1)
        if self.min_steps < self.max_steps < earliest:
            raise ValueError(
                f"max_steps ({self.max_steps}): the plateau rule can end the stage at step {earliest} at the "
                f"earliest (2 x window + patience - 1), so it never would; raise max_steps, shorten window or "
                f"patience, or set min_steps = max_steps for a stage of fixed length"
            )
        return self


class StageConfig(BaseModel):
    """One curriculum stage: reward composition, data mix and advance rule."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ..., min_length=1, max_length=64, description="Stage name shown in logs and transitions."
    )
    reward_weights: dict[str, Weight] = Field(
        ..., description=f"Weight per reward component; names from {COMPONENT_NAMES}."
    )
    tasks: list[Task] = Field(
        default_factory=lambda: list(TASKS),
        min_length=1,
        description="Data set tasks whose prompts this stage draws.",
    )
    difficulty_weights: dict[Difficulty, Probability] = Field(
        default_factory=lambda: {"easy": 0.5, "hard": 0.5},
        description="Probability of drawing each difficulty; must sum to 1.",
    )
    advance: PlateauConfig = Field(
        default_factory=PlateauConfig,
        description="When this stage ends (ignored on the last stage, which never ends).",
    )

    @field_validator("reward_weights")
    @classmethod
    def _check_reward_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(COMPONENT_NAMES))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; known: {list(COMPONENT_NAMES)}")
        if not any(weight > 0.0 for weight in weights.values()):
            raise ValueError("at least one component needs a weight > 0")
        return weights

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicates in {tasks}")
        return tasks

    @field_validator("difficulty_weights")
    @classmethod
    def _check_difficulty_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        total = math.fsum(weights.values())
        if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
            raise ValueError(f"must sum to 1, got {total!r}")
        return weights


class SamplerConfig(BaseModel):
    """Prompt sampling and the optional filter of prompts that carry no learning signal."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of every random choice the sampler makes.")
    filter_solved: bool = Field(
        False,
        description="Pass over prompts whose recent groups carried no signal: every sample of each earned the "
        "same reward (all solved, or all failed), the groups dynamic sampling sets aside.",
    )
    history: int = Field(
        2,
        ge=1,
        le=1000,
        description="Recent groups of a prompt that must all have carried no signal to filter it.",
    )
    max_skips: int = Field(
        3,
        ge=1,
        le=1_000_000,
        description="Times in a row a filtered prompt is passed over before it is issued again.",
    )


def default_stages() -> list[StageConfig]:
    """Visual Refocus' three stages: format + presence, then + category, then + IoU.

    Difficulty shifts from mostly easy to even as the reward gets harder to earn.
    """
    return [
        StageConfig(
            name="format_presence",
            reward_weights={"format": 1.0, "presence": 1.0},
            difficulty_weights={"easy": 0.8, "hard": 0.2},
        ),
        StageConfig(
            name="category",
            reward_weights={"format": 1.0, "presence": 1.0, "category": 1.0},
            difficulty_weights={"easy": 0.6, "hard": 0.4},
        ),
        StageConfig(
            name="iou",
            reward_weights={"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 1.0},
            difficulty_weights={"easy": 0.5, "hard": 0.5},
        ),
    ]


class CurriculumConfig(BaseModel):
    """The whole curriculum: ordered stages, where to start, and the prompt sampler."""

    model_config = ConfigDict(extra="forbid")

    stages: list[StageConfig] = Field(
        default_factory=default_stages, min_length=1, description="Stages in the order they run."
    )
    start_stage: int = Field(
        0, ge=0, description="Index of the stage a fresh run starts in (a checkpoint overrides it)."
    )
    sampler: SamplerConfig = Field(
        default_factory=SamplerConfig, description="How prompts are drawn for the current stage."
    )

    @model_validator(mode="after")
    def _check_stages(self) -> CurriculumConfig:
        if self.start_stage >= len(self.stages):
            raise ValueError(
                f"start_stage ({self.start_stage}) must be < number of stages ({len(self.stages)})"
            )
        names = [stage.name for stage in self.stages]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"stages: duplicate stage names {duplicates}")
        return self
