"""RewardConfig: everything the reward functions and the reward worker are configured by."""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewards.category import build_synonym_index
from rewards.components import CUSTOM, DEFAULT_WEIGHTS, OVERLONG, check_weights
from rewards.frames import FrameConfig
from rewards.iou import IouConfig
from rewards.overlong import OverlongConfig
from rewards.parse import DEFAULT_MAX_BOXES, DEFAULT_MAX_CHARS

# "package.module:function" - an import path, never code. Checked here, imported by the worker.
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class RewardConfig(BaseModel):
    """Reward settings of a run (one instance per reward worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frame: FrameConfig = Field(default_factory=FrameConfig, description="coordinate frame of completions")
    iou: IouConfig = Field(default_factory=IouConfig, description="box matching and scoring")
    format_mode: Literal["strict", "lenient"] = Field(
        "strict", description="format reward: full grammar + clean JSON (strict), or any extractable answer"
    )
    parse_mode: Literal["strict", "lenient"] = Field(
        "lenient", description="lenient: content rewards also read answers around grammar violations"
    )
    think_rule: Literal["free", "brief"] = Field(
        "free",
        description="free: the think is not checked; brief: the think must agree with the answer, 'present "
        "<category>' or 'none' for no animal, or the completion loses its answer (see rewards.think)",
    )
    no_object_credit: Literal["all", "presence"] = Field(
        "all",
        description="on an image without the object, a correct empty answer earns every component (all: "
        "category and IoU score 1 too) or format and presence only (presence: category, IoU and confidence "
        "score 0 there), so that the one decision is not paid three times",
    )
    synonyms: dict[str, list[str]] = Field(
        default_factory=dict, description="category synonyms: {canonical name: [other names]}"
    )
    max_boxes: int = Field(DEFAULT_MAX_BOXES, ge=1, le=10_000, description="answers with more boxes fail")
    max_chars: int = Field(DEFAULT_MAX_CHARS, ge=64, le=10_000_000, description="longer completions fail")
    overlong: OverlongConfig | None = Field(None, description="soft overlong penalty lengths (None: off)")
    default_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_WEIGHTS), description="{component: weight} when no stage says"
    )
    custom_reward: str | None = Field(
        None, description='optional extra reward "package.module:function", imported by the worker'
    )

    @field_validator("default_weights")
    @classmethod
    def _known_components(cls, weights: dict[str, float]) -> dict[str, float]:
        return check_weights(weights, where="default_weights")

    @field_validator("custom_reward")
    @classmethod
    def _import_path(cls, path: str | None) -> str | None:
        if path is not None and not IMPORT_PATH_RE.match(path):
            raise ValueError(f'custom_reward must be an import path "package.module:function", got {path!r}')
        return path

    @field_validator("synonyms")
    @classmethod
    def _synonyms_consistent(cls, synonyms: dict[str, list[str]]) -> dict[str, list[str]]:
        build_synonym_index(synonyms)  # raises naming a synonym claimed by two categories
        return synonyms

    @model_validator(mode="after")
    def _weights_computable(self) -> RewardConfig:
        check_computable(self, self.default_weights, where="default_weights")
        return self

    @cached_property
    def synonym_index(self) -> dict[str, str]:
        """Normalised synonym → normalised canonical name (see rewards.category)."""
        return build_synonym_index(self.synonyms)


def check_computable(config: RewardConfig, weights: dict[str, float], *, where: str) -> None:
    """Raise ValueError if a weighted component cannot be computed under ``config``."""
    if weights.get(OVERLONG, 0.0) != 0.0 and config.overlong is None:
        raise ValueError(f"{where} weights '{OVERLONG}' but rewards.overlong is not set")
    if weights.get(CUSTOM, 0.0) != 0.0 and config.custom_reward is None:
        raise ValueError(f"{where} weights '{CUSTOM}' but rewards.custom_reward is not set")
