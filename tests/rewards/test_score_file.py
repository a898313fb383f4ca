"""rewards.score_file: the JSONL scorer behind `refocus rewards score FILE.jsonl`."""

from __future__ import annotations

import json

import pytest

from rewards.config import RewardConfig
from rewards.score_file import score_jsonl

ANSWER = '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[%s]]}</answer>'
TARGET = {"boxes": [[160, 120, 320, 240]], "category": "moth", "present": True, "width": 640, "height": 480}


def _row(**fields) -> str:
    row = {"completion": ANSWER % "160, 120, 320, 240", "target": TARGET, "frame": "original"}
    row.update(fields)
    return json.dumps(row)


def test_rows_are_scored_in_order_with_line_numbers():
    lines = [
        _row(id="a"),
        "",
        "{not json",
        _row(completion=ANSWER % "161, 119, 322, 238", frame="input", input_width=644, input_height=476),
        _row(completion=ANSWER % "161, 119, 322, 238", frame="input", min_pixels=3136, max_pixels=1003520),
        _row(completion=ANSWER % "250, 250, 500, 500", frame="norm1000"),
        _row(completion="garbage"),
    ]
    out = list(score_jsonl(lines, config=RewardConfig()))
    assert [r["line"] for r in out] == [1, 3, 4, 5, 6, 7]
    first = out[0]
    assert first["id"] == "a"
    assert first["total"] == pytest.approx(4.0)  # default weights: all but overlong; no confidences
    assert first["iou"] == 1.0 and first["confidence"] == 0.0 and first["parse_failure"] is None
    assert "error" in out[1] and out[1]["line"] == 3
    assert out[2]["iou"] == pytest.approx(1.0)  # input frame from explicit input size
    assert out[3]["iou"] == pytest.approx(1.0)  # input frame from processor settings
    assert out[4]["iou"] == pytest.approx(1.0)  # 0-1000 of 640x480 -> [160, 120, 320, 240]
    assert out[5]["total"] == 0.0 and out[5]["parse_failure"] == "no_answer_tag"


def test_stage_weights_pick_the_table():
    tables = {1: {"format": 1.0, "presence": 1.0}, 3: {"iou": 2.0}}
    lines = [_row(stage=1), _row(stage=3), _row(stage=2), _row()]
    out = list(score_jsonl(lines, config=RewardConfig(), stage_weights=tables))
    assert out[0]["total"] == pytest.approx(2.0)
    assert out[1]["total"] == pytest.approx(2.0)
    assert "stage 2" in out[2]["error"]
    assert out[3]["total"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    "line, fragment",
    [
        (json.dumps({"target": TARGET}), "completion"),
        (_row(target={**TARGET, "width": 0}), "target.width"),
        (_row(target={**TARGET, "boxes": [[1, 2, 3]]}), "target.boxes"),
        (_row(frame="pixels"), "frame"),
        (_row(input_width=10), "input_height"),
        (_row(stage=-1), "stage"),
        (_row(target={**TARGET, "width": 10**400}), "target.width"),  # no float holds it: an error row
        (_row(input_width=10**400, input_height=100, frame="input"), "input_width"),
        (_row(extra_field=1), "extra_field"),
        (_row(target={**TARGET, "width": 1, "height": 500}, frame="input"), "aspect ratio"),
        ("[1, 2, 3]", "row"),
    ],
)
def test_malformed_rows_become_error_objects(line, fragment):
    (out,) = score_jsonl([line], config=RewardConfig())
    assert out["line"] == 1 and fragment in out["error"]


def test_overlong_needs_token_counts_per_row():
    config = RewardConfig(overlong={"l_max": 100, "l_cache": 20})
    tables = {0: {"iou": 1.0, "overlong": 1.0}}
    out = list(score_jsonl([_row(stage=0, num_tokens=90), _row(stage=0)], config=config, stage_weights=tables))
    assert out[0]["total"] == pytest.approx(1.0 - 0.5)
    assert "overlong" in out[1]["error"]


def test_bad_stage_table_fails_up_front():
    with pytest.raises(ValueError, match="'iuo'"):
        list(score_jsonl([_row()], config=RewardConfig(), stage_weights={1: {"iuo": 1.0}}))
