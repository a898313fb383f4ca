"""The ONE place where boxes move between coordinate frames.

Frames a completion's boxes can be in (``FrameSpec.kind``):
- ``original``: pixels of the data set image (the frame of every ground truth);
- ``input``: pixels of the processor-resized model input (Qwen2.5-VL's convention); the input size
  comes from ``smart_resize`` of the original size with the processor's min/max pixels;
- ``norm1000``: 0-1000 on both axes (Qwen2-VL's convention).

After a zoom the model sees a crop: a ``FrameSpec`` with ``crop`` set says the boxes refer to that
crop (given in original pixels), shown to the model at ``input_width x input_height`` for kind
``input``; ``norm1000`` is then relative to the crop, and ``original`` means crop pixels at native
resolution. Every conversion is ``original = box * (sx, sy) + (ox, oy)``, an axis-aligned affine map,
so a box stays a box and the inverse is exact up to float rounding.

``smart_resize`` is an exact reimplementation of transformers' Qwen2-VL ``smart_resize`` (the function
Qwen2.5-VL's image processor uses), pinned to it by a test. It is not imported at run time because
importing it pulls in torch: measured 4.5 s and 444 MB RSS per reward actor for a ten-line function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.types import Box

ORIGINAL = "original"
INPUT = "input"
NORM1000 = "norm1000"
FRAME_KINDS = (ORIGINAL, INPUT, NORM1000)
FrameKind = Literal["original", "input", "norm1000"]

NORM_SCALE = 1000.0
# Qwen2.5-VL image processor defaults (transformers: size shortest_edge / longest_edge; factor is
# patch_size 14 x spatial merge_size 2).
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280


MAX_ASPECT = 200  # the longest side over the shortest that Qwen2.5-VL's processor accepts


@lru_cache(maxsize=4096)
def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN_FACTOR,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) of the model input for an image of ``height x width`` pixels.

    Same arithmetic as transformers (including Python's round-half-to-even): both sides become
    multiples of ``factor``, the area is brought inside [min_pixels, max_pixels], the aspect ratio is
    kept as closely as possible. Raises ValueError for an aspect ratio above 200, as transformers does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT}, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True, slots=True)
class FrameSpec:
    """How to read the boxes of one completion (built by our code, so bad values raise)."""

    kind: str  # one of FRAME_KINDS
    input_width: int | None = None  # model-input width of the image the boxes refer to (kind input)
    input_height: int | None = None  # model-input height (kind input)
    crop: tuple[float, float, float, float] | None = None  # boxes refer to this crop (original px)

    def __post_init__(self) -> None:
        if self.kind not in FRAME_KINDS:
            raise ValueError(f"FrameSpec.kind must be one of {FRAME_KINDS}, got {self.kind!r}")
        if self.kind == INPUT and not (
            self.input_width and self.input_height and self.input_width > 0 and self.input_height > 0
        ):
            raise ValueError("FrameSpec.kind 'input' needs positive input_width and input_height")
        if self.crop is not None:
            x1, y1, x2, y2 = self.crop
            if not (x2 > x1 and y2 > y1):
                raise ValueError(f"FrameSpec.crop must have x2 > x1 and y2 > y1, got {self.crop}")


def affine_to_original(frame: FrameSpec, *, width: int, height: int) -> tuple[float, float, float, float]:
    """(sx, sy, ox, oy) with original = box * (sx, sy) + (ox, oy) for an image of width x height."""
    if frame.crop is None:
        ox, oy, ref_w, ref_h = 0.0, 0.0, float(width), float(height)
    else:
        ox, oy, x2, y2 = frame.crop
        ref_w, ref_h = x2 - ox, y2 - oy
    if frame.kind == ORIGINAL:
        return 1.0, 1.0, ox, oy
    if frame.kind == NORM1000:
        return ref_w / NORM_SCALE, ref_h / NORM_SCALE, ox, oy
    return ref_w / frame.input_width, ref_h / frame.input_height, ox, oy  # type: ignore[operator]


def to_original(boxes: Sequence[Sequence[float]], *, frame: FrameSpec, width: int, height: int) -> list[Box]:
    """Boxes in ``frame`` → original pixels of a width x height image. No clipping or reordering."""
    sx, sy, ox, oy = affine_to_original(frame, width=width, height=height)
    return [[b[0] * sx + ox, b[1] * sy + oy, b[2] * sx + ox, b[3] * sy + oy] for b in boxes]


def from_original(boxes: Sequence[Sequence[float]], *, frame: FrameSpec, width: int, height: int) -> list[Box]:
    """Inverse of ``to_original``: original pixels → ``frame`` (e.g. to write a target as the model should)."""
    sx, sy, ox, oy = affine_to_original(frame, width=width, height=height)
    return [[(b[0] - ox) / sx, (b[1] - oy) / sy, (b[2] - ox) / sx, (b[3] - oy) / sy] for b in boxes]


def crop_to_original(
    boxes: Sequence[Sequence[float]], *, crop_box: Sequence[float], crop_size: tuple[int, int]
) -> list[Box]:
    """Boxes in pixels of a zoom crop shown at ``crop_size`` = (width, height) → original pixels.

    ``crop_box`` is the crop's region in original pixels. Same as ``to_original`` with an ``input``
    frame on that crop; kept as a named helper for the zoom environment.
    """
    frame = FrameSpec(
        kind=INPUT, input_width=crop_size[0], input_height=crop_size[1], crop=tuple(crop_box)  # type: ignore[arg-type]
    )
    return to_original(boxes, frame=frame, width=0, height=0)


class FrameConfig(BaseModel):
    """Which frame completions use, and the processor settings the ``input`` frame depends on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FrameKind = Field(INPUT, description="frame of the boxes the model writes")
    min_pixels: int = Field(QWEN_MIN_PIXELS, ge=1, description="processor min_pixels (input frame)")
    max_pixels: int = Field(QWEN_MAX_PIXELS, ge=1, description="processor max_pixels (input frame)")
    factor: int = Field(QWEN_FACTOR, ge=1, le=1024, description="patch size x spatial merge size")

    @model_validator(mode="after")
    def _pixels_ordered(self) -> FrameConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        return self

    def spec(self, *, width: int, height: int) -> FrameSpec:
        """The frame of a completion about a full (not zoomed) width x height image."""
        if self.kind != INPUT:
            return _plain_spec(self.kind)
        return input_spec(
            width=width, height=height, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )


@lru_cache(maxsize=8)
def _plain_spec(kind: str) -> FrameSpec:
    return FrameSpec(kind=kind)


@lru_cache(maxsize=4096)
def input_spec(*, width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> FrameSpec:
    """The ``input`` frame of a full width x height image under the given processor settings."""
    in_h, in_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return FrameSpec(kind=INPUT, input_width=in_w, input_height=in_h)
