"""Contact sheets: a grid of data set images with ground-truth (green) and predicted (magenta) boxes.

Used by the generator to show what it made, and later by evaluation to show what a model predicted:
``predictions`` maps a row id to a parsed answer ``{"present", "category", "boxes"}`` whose boxes are
already in ORIGINAL pixels, optionally with ``zoom_boxes``: the regions the model zoomed into (yellow).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rewards.iou import sanitize

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 255)
ZOOM_COLOUR = (255, 220, 0)
BACKGROUND = (24, 24, 24)
LINE_HEIGHT = 12  # pixels per label line under each tile


def sheet_size(n_rows: int, *, columns: int, tile: int, with_predictions: bool) -> tuple[int, int]:
    """(width, height) in pixels of a sheet holding ``n_rows`` images."""
    lines = 2 if with_predictions else 1
    grid_rows = max(1, -(-n_rows // columns))
    return columns * tile, grid_rows * (tile + lines * LINE_HEIGHT)


def draw_contact_sheet(rows: Sequence[Mapping[str, Any]], *, out_path: str | os.PathLike[str], columns: int = 8,
                       tile: int = 224,
                       predictions: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[int, int]:
    """Draw ``rows`` (data set rows) into a PNG grid at ``out_path``; returns the sheet's (width, height).

    Each image is scaled to fit a ``tile`` x ``tile`` square; its label line reads
    "category difficulty" ("present" for an object without a category, "absent" for none), and
    "pred: category" alike when a prediction is given.
    An undecodable image is drawn as an empty tile labelled so, never an error.
    """
    if columns < 1 or tile < 16:
        raise ValueError("columns and tile: need columns >= 1 and tile >= 16")
    with_predictions = predictions is not None
    width, height = sheet_size(len(rows), columns=columns, tile=tile, with_predictions=with_predictions)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cell_height = height // max(1, -(-len(rows) // columns))
    for index, row in enumerate(rows):
        left, top = (index % columns) * tile, (index // columns) * cell_height
        placed = _paste(sheet, row, left=left, top=top, tile=tile)
        label = f"{_verdict(row)} {row.get('difficulty', '')}".strip()
        if placed is None:
            label = "undecodable image"
        else:
            _boxes(draw, row.get("boxes") or [], left=left, top=top, placed=placed, colour=GT_COLOUR)
        draw.text((left + 2, top + tile), label, fill=GT_COLOUR, font=font)
        if with_predictions:
            predicted = predictions.get(str(row.get("id")))
            if predicted is None:
                text = "pred: none"
            else:
                text = f"pred: {_verdict(predicted)}"
                if placed is not None:
                    _boxes(draw, predicted.get("zoom_boxes") or [], left=left, top=top, placed=placed,
                           colour=ZOOM_COLOUR)
                    _boxes(draw, predicted.get("boxes") or [], left=left, top=top, placed=placed,
                           colour=PRED_COLOUR)
            draw.text((left + 2, top + tile + LINE_HEIGHT), text, fill=PRED_COLOUR, font=font)
    sheet.save(os.fspath(out_path), format="PNG", compress_level=6)
    return width, height


def _verdict(answer: Mapping[str, Any]) -> str:
    """What a row or a prediction says: "absent" for no object, else its category, else "present" (CAMO-style
    imports and answers name no category)."""
    if answer.get("present") is False:
        return "absent"
    return answer.get("category") or ("present" if answer.get("present") else "absent")


@dataclass(frozen=True)
class _Placement:
    """How an image lies in its tile: its width x height pixels scaled by ``scale``."""

    scale: float
    width: int
    height: int


def _paste(sheet: Image.Image, row: Mapping[str, Any], *, left: int, top: int, tile: int) -> _Placement | None:
    """Paste the row's image scaled into its tile; returns where it lies, None if undecodable."""
    try:
        with Image.open(io.BytesIO(row["image"])) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, Image.DecompressionBombError):
        return None
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sheet.paste(image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR),
                (left, top))
    return _Placement(scale=scale, width=image.width, height=image.height)


def _boxes(draw: ImageDraw.ImageDraw, boxes: Sequence[Sequence[float]], *, left: int, top: int,
           placed: _Placement, colour: tuple[int, int, int]) -> None:
    """Draw boxes (original pixels) as scoring reads them (``rewards.iou.sanitize``: corners in either order,
    clipped to the image), so a box scored by its reordered corners is drawn, and none reaches into a
    neighbouring tile."""
    for box in boxes:
        try:
            corners = np.array([[float(v) for v in box]])
        except (TypeError, ValueError):
            continue  # a malformed predicted box is skipped, not drawn
        if corners.shape != (1, 4) or not np.isfinite(corners).all():
            continue
        x1, y1, x2, y2 = (sanitize(corners, placed.width, placed.height)[0] * placed.scale).tolist()
        if x2 > x1 and y2 > y1:
            # Box edges are pixel edges: the last covered pixel ends at x2, so draw up to x2 - 1 (at least one
            # pixel: a box thinner than a pixel at this scale is still drawn).
            draw.rectangle((left + x1, top + y1, left + max(x1, x2 - 1), top + max(y1, y2 - 1)), outline=colour,
                           width=1)
