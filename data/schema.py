"""The data set row contract: one Parquet schema, streaming read/write helpers and a row check.

A row is a plain dict with the fields of ``ROW_SCHEMA``. Boxes are ``[x1, y1, x2, y2]`` in ORIGINAL
image pixels with pixel-EDGE coordinates: a box covering pixel columns 3..5 is ``x1=3, x2=6``, so
``x2 - x1`` is the width in pixels and a full-image box is ``[0, 0, width, height]``.

Box rule (one place, used by importers, the generator and readers):
  * every coordinate is clamped into the image, x to [0, width] and y to [0, height];
  * a box whose clamped width or height is below ``MIN_BOX_SIDE`` pixels (zero area, inverted or
    lying entirely outside the image) makes the whole row invalid. It is not silently dropped,
    because dropping one of several ground-truth boxes would teach a wrong object count.
``validate_row`` reports problems AFTER applying that clamp, so a box that overhangs the image by
half a pixel (common in annotation tools) is not a problem; ``clamp_row`` returns the clamped copy.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TASKS = ("camo", "classify", "detect", "ground")
DIFFICULTIES = ("easy", "hard")
# Tasks whose answer must locate the object: a present row of these tasks needs at least one box.
LOCALIZING_TASKS = ("camo", "detect", "ground")
MIN_BOX_SIDE = 1.0  # pixels; smaller boxes cannot be drawn, cropped or matched meaningfully
# A category must hold a letter or digit and not be a word the category reward reads as naming nothing: with
# " ?! " or "None" (a converter's str(None)) a present object would reward answers naming no category.
_NAMES_SOMETHING = re.compile(r"[^\W_]")


def names_something(category: str) -> bool:
    """Whether ``category`` can be a row's category (``validate_row``'s rule): it holds a letter or digit and
    names a category as the reward reads it ("none", "null" and their variants name none)."""
    from rewards.category import names_a_category

    return bool(_NAMES_SOMETHING.search(category)) and names_a_category(category)

ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded PNG (JPEG kept as-is by importers)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("boxes", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("present", pa.bool_(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("difficulty", pa.string(), nullable=False),
    ]
)
FIELD_NAMES = tuple(ROW_SCHEMA.names)

# Fixed writer settings: the same rows always give byte-identical files (no timestamps are written).
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 3
ROWS_PER_GROUP = 256  # small row groups let the training loop stream a large set batch by batch

ProgressFn = Callable[[int, int], None]
"""Progress callback of long data jobs (generation, imports): called with (items done, items total)."""


def write_rows(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Stream ``rows`` (dicts with the ROW_SCHEMA fields) into a Parquet file; returns the row count.

    Rows are written in groups of ``ROWS_PER_GROUP`` so that an import of thousands of images never
    holds them all in memory. An empty iterable writes a valid file with zero rows.
    """
    count = 0
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(
        os.fspath(path),
        ROW_SCHEMA,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
    ) as writer:
        for row in rows:
            batch.append(row)
            if len(batch) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=ROW_SCHEMA))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=ROW_SCHEMA))
            count += len(batch)
    return count


def iter_rows(path: str | os.PathLike[str], *, batch_size: int = ROWS_PER_GROUP) -> Iterator[dict]:
    """Yield the rows of a Parquet file one by one, reading ``batch_size`` rows at a time."""
    parquet = pq.ParquetFile(os.fspath(path))
    for batch in parquet.iter_batches(batch_size=batch_size, columns=list(FIELD_NAMES)):
        yield from batch.to_pylist()


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a Parquet file as dicts (for small sets and tests; use ``iter_rows`` for large)."""
    return list(iter_rows(path))


def clamp_box(box: list[float], *, width: int, height: int) -> list[float]:
    """Clamp one ``[x1, y1, x2, y2]`` box into the image (x into [0, width], y into [0, height])."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    ]


def clamp_row(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``row`` with every box clamped into the image (see the module's box rule)."""
    boxes = [clamp_box(b, width=row["width"], height=row["height"]) for b in row["boxes"]]
    return {**row, "boxes": boxes}


def validate_row(row: Any, *, decode_image: bool = True) -> list[str]:
    """Problems that make ``row`` unusable (empty list: usable after ``clamp_row``). Never raises.

    Each problem names the field it concerns, e.g. ``"task: unknown 'segment'"``. With
    ``decode_image`` the image bytes are decoded (about 0.2 ms for 112 px) and their size compared
    with ``width``/``height``; without it only non-emptiness is checked.
    """
    if not isinstance(row, dict):
        return [f"row: expected a dict, got {type(row).__name__}"]
    missing = [name for name in FIELD_NAMES if name not in row]
    if missing:
        return [f"{name}: missing" for name in missing]
    problems: list[str] = []
    for name in ("id", "question", "split"):
        if not isinstance(row[name], str) or not row[name].strip():
            problems.append(f"{name}: expected a non-empty string")
    if row["task"] not in TASKS:
        problems.append(f"task: unknown {row['task']!r} (expected one of {TASKS})")
    if row["difficulty"] not in DIFFICULTIES:
        problems.append(f"difficulty: unknown {row['difficulty']!r} (expected one of {DIFFICULTIES})")
    if row["category"] is not None and (not isinstance(row["category"], str)
                                        or not names_something(row["category"])):
        problems.append("category: expected a non-empty string or null (a name: letters or digits, not 'none')")
    if not isinstance(row["present"], bool):
        problems.append("present: expected a bool")
    size_ok = True
    for name in ("width", "height"):
        if isinstance(row[name], bool) or not isinstance(row[name], int) or row[name] <= 0:
            problems.append(f"{name}: expected a positive int")
            size_ok = False
    boxes_ok = isinstance(row["boxes"], list)
    if not boxes_ok:
        problems.append("boxes: expected a list of [x1, y1, x2, y2]")
    elif size_ok:
        problems += _box_problems(row["boxes"], width=row["width"], height=row["height"])
    if boxes_ok and isinstance(row["present"], bool):
        problems += _presence_problems(row)
    if not isinstance(row["image"], bytes) or not row["image"]:
        problems.append("image: expected non-empty encoded bytes")
    elif decode_image and size_ok:
        problems += _image_problems(row["image"], width=row["width"], height=row["height"])
    return problems


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def _box_problems(boxes: list[Any], *, width: int, height: int) -> list[str]:
    problems = []
    for i, box in enumerate(boxes):
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            problems.append(f"boxes[{i}]: expected 4 numbers")
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            problems.append(f"boxes[{i}]: expected 4 numbers")
            continue
        if not all(_finite(v) for v in box):
            problems.append(f"boxes[{i}]: non-finite coordinate")
            continue
        x1, y1, x2, y2 = clamp_box(list(box), width=width, height=height)
        if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
            problems.append(f"boxes[{i}]: smaller than {MIN_BOX_SIDE} px after clamping to the image")
    return problems


def _presence_problems(row: dict[str, Any]) -> list[str]:
    if not row["present"]:
        problems = []
        if row["boxes"]:
            problems.append("boxes: must be empty when present is false")
        if row["category"] is not None:
            problems.append("category: must be null when present is false")
        return problems
    if row["task"] in LOCALIZING_TASKS and not row["boxes"]:
        return [f"boxes: a present {row['task']!r} row needs at least one box"]
    if row["task"] == "classify" and row["category"] is None:
        return ["category: a present 'classify' row needs a category"]
    return []


def _image_problems(data: bytes, *, width: int, height: int) -> list[str]:
    size = decoded_size(data)
    if size is None:
        return ["image: cannot be decoded"]
    if size != (width, height):
        return [f"image: decoded size {size[0]}x{size[1]} differs from width x height {width}x{height}"]
    return []


def decoded_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of fully decoded image bytes, or None if they do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode every pixel: truncated files fail here, not at training time
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
