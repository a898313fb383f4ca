"""Score a JSONL file of completions: the engine of ``refocus rewards score FILE.jsonl``.

One JSON object per line::

    {"completion": "<think>...</think><answer>{...}</answer>",
     "target": {"boxes": [[x1, y1, x2, y2], ...], "category": "moth" | null, "present": true,
                "width": 640, "height": 480},
     "frame": "original" | "input" | "norm1000",      (optional; default RewardConfig.frame.kind)
     "stage": 2 | null,                               (optional; picks the weights, see below)
     "id": "any string or int",                       (optional; echoed in the output)
     "num_tokens": 812,                               (optional; needed if the weights use overlong)
     "input_width": 644, "input_height": 476,         (optional, frame "input")
     "min_pixels": 3136, "max_pixels": 1003520}       (optional, frame "input")

Target boxes are in original pixels. For the ``input`` frame the model-input size is taken from
``input_width``/``input_height`` if given, else computed with smart_resize from the row's
``min_pixels``/``max_pixels``, else from RewardConfig.frame's processor settings.

Weights: ``stage`` null or absent → RewardConfig.default_weights (every built-in component with
weight 1 except overlong); otherwise ``stage_weights[stage]`` (a mapping passed in, e.g. from the
curriculum's stage table); a stage missing from it is an error row.

Output: one JSON object per non-blank input line, in order: ``{"line": n, "id": ..., "total": t,
<component>: value, ..., "parse_failure": reason | null, "strict_violation": reason | null}``, or
``{"line": n, "error": "..."}`` for a row that cannot be scored. Never raises on row content.
"""

from __future__ import annotations

from typing import Annotated, Iterable, Iterator, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rewards.components import check_weights
from rewards.compose import score_batch
from rewards.config import RewardConfig, check_computable
from rewards.frames import INPUT, FrameKind, FrameSpec, input_spec
from rewards.types import Target


Coordinate = Annotated[float, Field(allow_inf_nan=False)]
MAX_SIDE = 2**20  # pixels: no image is larger, and a larger int overflows the float arithmetic of frames


class TargetRow(BaseModel):
    """Ground truth of a row (original pixels)."""

    model_config = ConfigDict(extra="forbid")

    boxes: list[tuple[Coordinate, Coordinate, Coordinate, Coordinate]] = Field(
        ..., description="true boxes [x1, y1, x2, y2]"
    )
    category: str | None = Field(None, description="true category, null when none")
    present: bool = Field(..., description="whether the object is in the image")
    width: int = Field(..., ge=1, le=MAX_SIDE, description="original image width")
    height: int = Field(..., ge=1, le=MAX_SIDE, description="original image height")


class ScoreRow(BaseModel):
    """One line of the JSONL file."""

    model_config = ConfigDict(extra="forbid")

    completion: str = Field(..., description="model completion text")
    target: TargetRow = Field(..., description="ground truth")
    frame: FrameKind | None = Field(None, description="frame of the completion's boxes")
    stage: int | None = Field(None, ge=0, description="curriculum stage whose weights apply (0-based, as the run "
                              "records it)")
    id: str | int | None = Field(None, description="echoed in the output")
    num_tokens: int | None = Field(None, ge=0, description="completion length in tokens (overlong)")
    input_width: int | None = Field(None, ge=1, le=MAX_SIDE, description="model-input width (input frame)")
    input_height: int | None = Field(None, ge=1, le=MAX_SIDE, description="model-input height (input frame)")
    min_pixels: int | None = Field(None, ge=1, le=MAX_SIDE**2, description="processor min_pixels (input frame)")
    max_pixels: int | None = Field(None, ge=1, le=MAX_SIDE**2, description="processor max_pixels (input frame)")

    @model_validator(mode="after")
    def _pairs_complete(self) -> ScoreRow:
        if (self.input_width is None) != (self.input_height is None):
            raise ValueError("input_width and input_height must be given together")
        if (self.min_pixels is None) != (self.max_pixels is None):
            raise ValueError("min_pixels and max_pixels must be given together")
        return self


def score_jsonl(
    lines: Iterable[str],
    *,
    config: RewardConfig,
    stage_weights: Mapping[int, Mapping[str, float]] | None = None,
) -> Iterator[dict]:
    """Yield one result object per non-blank line (see the module docstring).

    Raises ValueError (when iteration starts) only for a bad ``stage_weights`` table: the caller's
    input, not the file's.
    """
    tables = {
        int(stage): check_weights(weights, where=f"stage {stage} weights")
        for stage, weights in (stage_weights or {}).items()
    }
    for stage, weights in tables.items():
        check_computable(config, weights, where=f"stage {stage}")
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield _score_line(line, line_no, config, tables)
        except (ValidationError, ValueError) as err:
            yield {"line": line_no, "error": _short(err)}


def _score_line(line: str, line_no: int, config: RewardConfig, tables: Mapping[int, dict[str, float]]) -> dict:
    row = ScoreRow.model_validate_json(line)
    if row.stage is None:
        weights = config.default_weights
    elif row.stage in tables:
        weights = tables[row.stage]
    else:
        raise ValueError(f"no weights for stage {row.stage} (known: {sorted(tables)})")
    t = row.target
    target = Target(
        present=t.present, category=t.category, boxes=[list(b) for b in t.boxes], width=t.width, height=t.height
    )
    result = score_batch(
        [row.completion],
        [target],
        config=config,
        weights=weights,
        frames=[_frame(row, config)],
        num_tokens=[row.num_tokens] if row.num_tokens is not None else None,
    )[0]
    out: dict = {"line": line_no}
    if row.id is not None:
        out["id"] = row.id
    out["total"] = result.total
    out.update(result.components)
    out["parse_failure"] = result.failure
    out["strict_violation"] = result.strict_violation
    return out


def _frame(row: ScoreRow, config: RewardConfig) -> FrameSpec:
    kind = row.frame or config.frame.kind
    if kind != INPUT:
        return FrameSpec(kind=kind)
    if row.input_width is not None:
        return FrameSpec(kind=INPUT, input_width=row.input_width, input_height=row.input_height)
    min_pixels = row.min_pixels if row.min_pixels is not None else config.frame.min_pixels
    max_pixels = row.max_pixels if row.max_pixels is not None else config.frame.max_pixels
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must be <= max_pixels ({max_pixels})")
    return input_spec(
        width=row.target.width,
        height=row.target.height,
        factor=config.frame.factor,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


def _short(err: Exception) -> str:
    """A one-line error message (pydantic's include every failing field, joined here)."""
    if isinstance(err, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in err.errors()]
        return "; ".join(parts)
    return str(err)
