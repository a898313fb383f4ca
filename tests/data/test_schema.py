"""Row schema: round trip through Parquet, streaming in row groups, and the row check."""

from __future__ import annotations

import io
import math

import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.schema import ROW_SCHEMA, ROWS_PER_GROUP, clamp_box, clamp_row, read_rows, validate_row, write_rows


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(**overrides):
    row = {
        "id": "r0", "image": _png(48, 32), "width": 48, "height": 32, "task": "camo",
        "question": "Is there a camouflaged animal?", "category": "moth", "boxes": [[4.0, 2.5, 20.0, 30.0]],
        "present": True, "split": "train", "difficulty": "hard",
    }
    row.update(overrides)
    return row


def test_round_trip_keeps_every_field_and_the_schema(tmp_path):
    rows = [_row(), _row(id="r1", category=None, boxes=[], present=False, difficulty="easy")]
    path = tmp_path / "rows.parquet"
    assert write_rows(rows, path) == 2
    assert pq.read_schema(path).equals(ROW_SCHEMA)
    assert read_rows(path) == rows  # 2.5, 4.0 ... are exact in float32


def test_rows_stream_in_groups_and_keep_order(tmp_path):
    image = _png(8, 8)
    rows = ({**_row(id=f"r{i}", image=image, width=8, height=8, boxes=[[0.0, 0.0, 8.0, 8.0]])}
            for i in range(ROWS_PER_GROUP + 3))
    path = tmp_path / "many.parquet"
    assert write_rows(rows, path) == ROWS_PER_GROUP + 3
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    assert [r["id"] for r in read_rows(path)] == [f"r{i}" for i in range(ROWS_PER_GROUP + 3)]


def test_empty_input_writes_a_readable_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    assert write_rows([], path) == 0
    assert read_rows(path) == []


def test_a_good_row_has_no_problems():
    assert validate_row(_row()) == []
    assert validate_row(_row(category=None, boxes=[], present=False)) == []


def test_boxes_overhanging_the_image_are_clamped_not_rejected():
    row = _row(boxes=[[-2.0, 3.0, 50.5, 20.0]])
    assert validate_row(row) == []
    assert clamp_row(row)["boxes"] == [[0.0, 3.0, 48.0, 20.0]]
    assert clamp_box([60, -5, 70, 40], width=48, height=32) == [48.0, 0.0, 48.0, 32.0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"task": "segment"}, "task: unknown 'segment'"),
        ({"difficulty": "medium"}, "difficulty: unknown"),
        ({"boxes": [[5.0, 5.0, 5.0, 20.0]]}, "boxes[0]: smaller than"),  # zero width
        ({"boxes": [[30.0, 5.0, 10.0, 20.0]]}, "boxes[0]: smaller than"),  # inverted
        ({"boxes": [[50.0, 5.0, 60.0, 20.0]]}, "boxes[0]: smaller than"),  # entirely right of the image
        ({"boxes": [[1.0, 2.0, math.nan, 9.0]]}, "boxes[0]: non-finite"),
        ({"boxes": [[1, 2, 10**400, 9]]}, "boxes[0]: non-finite"),  # an int no float holds: reported, not raised
        ({"boxes": [[1.0, 2.0, 3.0]]}, "boxes[0]: expected 4 numbers"),
        ({"boxes": [[1.0, 2.0, "3", 9.0]]}, "boxes[0]: expected 4 numbers"),
        ({"image": b"\x89PNG\r\n\x1a\n broken"}, "image: cannot be decoded"),
        ({"image": b""}, "image: expected non-empty"),
        ({"width": 50}, "image: decoded size 48x32 differs"),
        ({"width": 0}, "width: expected a positive int"),
        ({"present": False}, "boxes: must be empty when present is false"),
        ({"boxes": []}, "boxes: a present 'camo' row needs at least one box"),
        ({"task": "classify", "category": None, "boxes": []}, "category: a present 'classify' row needs"),
        ({"present": "yes"}, "present: expected a bool"),
        ({"id": ""}, "id: expected a non-empty string"),
        ({"category": ""}, "category: expected a non-empty string or null"),
        # a converter's str(None): the category reward reads it as naming nothing, so "present none" would pay
        ({"category": "None"}, "category: expected a non-empty string or null"),
        ({"category": "NULL."}, "category: expected a non-empty string or null"),
    ],
)
def test_bad_rows_name_the_field(overrides, expected):
    problems = validate_row(_row(**overrides))
    assert any(p.startswith(expected) for p in problems), problems


def test_missing_fields_and_non_dicts_are_reported_not_raised():
    row = _row()
    del row["split"]
    assert validate_row(row) == ["split: missing"]
    assert validate_row(None) == ["row: expected a dict, got NoneType"]


def test_image_decoding_can_be_skipped():
    assert validate_row(_row(image=b"not an image"), decode_image=False) == []
