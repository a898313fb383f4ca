"""Curriculum: reward stages, plateau-driven stage changes and stage-aware prompt sampling.

Imports no other package of ours (only pydantic and numpy), so the learner, the driver and the tests
can use it anywhere.
"""

from curriculum.config import (
    COMPONENT_NAMES,
    CurriculumConfig,
    PlateauConfig,
    SamplerConfig,
    StageConfig,
    default_stages,
)
from curriculum.manager import CurriculumManager, DataMix, Transition
from curriculum.plateau import PlateauDetector
from curriculum.sampler import PromptMeta, PromptSampler

__all__ = [
    "COMPONENT_NAMES",
    "CurriculumConfig",
    "CurriculumManager",
    "DataMix",
    "PlateauConfig",
    "PlateauDetector",
    "PromptMeta",
    "PromptSampler",
    "SamplerConfig",
    "StageConfig",
    "Transition",
    "default_stages",
]
