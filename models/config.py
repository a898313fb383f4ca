"""Which model a run uses, and the local resolution of the embedded defaults."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SIZES = ("tiny", "small")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        "builtin:tiny",
        description="a local Qwen2.5-VL checkpoint directory, or builtin:tiny / builtin:small (built locally)",
    )
    cache_dir: str = Field("artifacts/models", description="where builtin models are built")
    seed: int = Field(0, ge=0, description="seed of a builtin model's random weights and tokenizer corpus")

    @field_validator("path")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith(BUILTIN_PREFIX) and value[len(BUILTIN_PREFIX) :] not in BUILTIN_SIZES:
            raise ValueError(f"unknown builtin model {value!r}; choose builtin:tiny or builtin:small")
        return value


def resolve_model_path(config: ModelConfig) -> Path:
    """The checkpoint directory for ``config``, building a builtin model on first use.

    Nothing is ever downloaded: a path that is not a builtin name must be an existing local directory
    holding a Qwen2.5-VL ``config.json``.
    """
    if config.path.startswith(BUILTIN_PREFIX):
        size = config.path[len(BUILTIN_PREFIX) :]
        from models.build import RECIPES, build_model, is_built_by

        out = Path(config.cache_dir) / f"{size}-seed{config.seed}"
        if not is_built_by(out, size=size, seed=config.seed, recipe=RECIPES[size]):
            # Missing, or built by an older recipe (e.g. before the warm start existed): build anew.
            log.info("building the builtin %s model in %s", size, out)
            build_model(size=size, out_dir=out, seed=config.seed, replace_any=True)
        return out
    path = Path(config.path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"model.path: {path} is not a local checkpoint directory with a config.json "
            "(models are never downloaded; use builtin:tiny, builtin:small or a local Qwen2.5-VL directory)"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"model.path: {path} holds a {model_type!r} model; Refocus expects qwen2_5_vl")
    return path
