"""rewards.compose and rewards.config: weighted totals, frames end to end, config validation."""

from __future__ import annotations

import gc

import pytest
from pydantic import ValidationError

from rewards.compose import paused_gc, score_batch, weighted_total
from rewards.config import RewardConfig
from rewards.frames import INPUT, FrameSpec
from rewards.types import Target

ORIGINAL_FRAME = {"kind": "original"}
MOTH_10 = '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[0, 0, 10, 10]]}</answer>'
TALL = Target(present=True, category="moth", boxes=[[0, 0, 10, 20]], width=100, height=100)


def test_weighted_total_hand_computed():
    config = RewardConfig(frame=ORIGINAL_FRAME)
    weights = {"format": 0.5, "presence": 1.0, "category": 2.0, "iou": 4.0, "confidence": 1.0}
    (result,) = score_batch([MOTH_10], [TALL], config=config, weights=weights)
    # IoU of [0,0,10,10] with [0,0,10,20] is 0.5; no confidences given -> confidence 0.
    assert result.components == {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 0.5, "confidence": 0.0}
    assert result.total == pytest.approx(0.5 + 1.0 + 2.0 + 4.0 * 0.5 + 0.0)
    assert result.failure is None and result.strict_violation is None
    assert weighted_total(result.components, weights) == pytest.approx(result.total)


def test_parse_failure_scores_zero_and_keeps_the_length_penalty():
    config = RewardConfig(frame=ORIGINAL_FRAME, overlong={"l_max": 100, "l_cache": 20})
    weights = {"format": 1.0, "iou": 1.0, "overlong": 1.0}
    (result,) = score_batch(["<think>cut off"], [TALL], config=config, weights=weights, num_tokens=[90])
    assert result.failure == "no_answer_tag"
    assert result.components["overlong"] == pytest.approx(-0.5)
    assert result.total == pytest.approx(-0.5)
    assert all(result.components[k] == 0.0 for k in ("format", "presence", "category", "iou", "confidence"))


def test_input_frame_is_converted_before_scoring():
    # 640x480 image -> model input 644x476 (smart_resize); the model writes input pixels.
    target = Target(present=True, category="moth", boxes=[[160, 120, 320, 240]], width=640, height=480)
    completion = '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[161, 119, 322, 238]]}</answer>'
    right = score_batch([completion], [target], config=RewardConfig(frame={"kind": INPUT}), weights={"iou": 1.0})
    assert right[0].components["iou"] == pytest.approx(1.0)
    # Read as original pixels instead: inter 159 x 118, union 161*119 + 160*120 - 159*118.
    wrong = score_batch([completion], [target], config=RewardConfig(frame=ORIGINAL_FRAME), weights={"iou": 1.0})
    assert wrong[0].components["iou"] == pytest.approx(159 * 118 / (161 * 119 + 160 * 120 - 159 * 118))


def test_per_row_frame_overrides_config():
    target = Target(present=True, category="moth", boxes=[[200, 50, 300, 150]], width=640, height=480)
    completion = '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[224, 0, 448, 224]]}</answer>'
    crop = FrameSpec(kind=INPUT, input_width=448, input_height=448, crop=(100, 50, 300, 250))
    config = RewardConfig(frame=ORIGINAL_FRAME)
    results = score_batch([completion] * 2, [target] * 2, config=config, weights={"iou": 1.0}, frames=[crop, None])
    assert results[0].components["iou"] == pytest.approx(1.0)
    assert results[1].components["iou"] < 0.2


def test_format_and_parse_modes():
    text = "Here you go: " + MOTH_10
    lenient_format = RewardConfig(frame=ORIGINAL_FRAME, format_mode="lenient")
    strict_format = RewardConfig(frame=ORIGINAL_FRAME)
    strict_parse = RewardConfig(frame=ORIGINAL_FRAME, parse_mode="strict")
    weights = {"format": 1.0, "iou": 1.0}
    assert score_batch([text], [TALL], config=lenient_format, weights=weights)[0].total == pytest.approx(1.5)
    assert score_batch([text], [TALL], config=strict_format, weights=weights)[0].total == pytest.approx(0.5)
    refused = score_batch([text], [TALL], config=strict_parse, weights=weights)[0]
    assert refused.total == 0.0 and refused.failure == "text_outside_tags"


def test_no_object_answer():
    config = RewardConfig(frame=ORIGINAL_FRAME)
    empty = Target(present=False, category=None, boxes=[], width=100, height=100)
    right = '<think>a</think><answer>{"present": false, "category": null, "boxes": []}</answer>'
    wrong = '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[1, 1, 5, 5]], "confidences": [0.75]}</answer>'
    results = score_batch([right, wrong], [empty, empty], config=config, weights=config.default_weights)
    assert results[0].components == {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 1.0, "confidence": 1.0}
    assert results[1].components == {"format": 1.0, "presence": 0.0, "category": 0.0, "iou": 0.0, "confidence": 0.25}


def test_synonyms_from_config():
    config = RewardConfig(frame=ORIGINAL_FRAME, synonyms={"moth": ["miller"]})
    text = '<think>a</think><answer>{"present": true, "category": "Millers", "boxes": []}</answer>'
    assert score_batch([text], [TALL], config=config, weights={"category": 1.0})[0].total == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"default_weights": {"iuo": 1.0}}, "'iuo'"),
        ({"default_weights": {"iou": float("nan")}}, "finite"),
        ({"default_weights": {"overlong": 1.0}}, "overlong"),
        ({"default_weights": {"custom": 1.0}}, "custom_reward"),
        ({"custom_reward": "os.system"}, "import path"),
        ({"custom_reward": "pkg.mod:fn; import os"}, "import path"),
        ({"custom_reward": "__import__('os'):system"}, "import path"),
        ({"synonyms": {"moth": ["miller"], "crab": ["Millers"]}}, "Millers"),
        ({"max_boxes": 0}, "max_boxes"),
        ({"iou": {"threshold": 1.0}}, "threshold"),
        ({"iou": {"mode": "hungarian"}}, "mode"),
        ({"frame": {"kind": "pixel"}}, "kind"),
        ({"format_mode": "loose"}, "format_mode"),
        ({"rewards": {}}, "rewards"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        RewardConfig(**kwargs)


def test_config_accepts_a_custom_import_path_without_importing_it():
    config = RewardConfig(custom_reward="no_such_package.rewards:score", default_weights={"custom": 0.5})
    assert config.custom_reward == "no_such_package.rewards:score"


def test_score_time_errors_name_the_problem():
    config = RewardConfig(frame=ORIGINAL_FRAME)
    with pytest.raises(ValueError, match="'bogus'"):
        score_batch([MOTH_10], [TALL], config=config, weights={"bogus": 1.0})
    with pytest.raises(ValueError, match="targets"):
        score_batch([MOTH_10, MOTH_10], [TALL], config=config, weights={"iou": 1.0})
    overlong = RewardConfig(frame=ORIGINAL_FRAME, overlong={"l_max": 10, "l_cache": 5})
    with pytest.raises(ValueError, match="overlong"):
        score_batch([MOTH_10], [TALL], config=overlong, weights={"overlong": 1.0})


def test_gc_pause_restores_the_previous_state():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause must not re-enable early
    assert gc.isenabled()
    score_batch([MOTH_10], [TALL], config=RewardConfig(frame=ORIGINAL_FRAME), weights={"iou": 1.0})
    assert gc.isenabled()
    gc.disable()
    try:
        score_batch([MOTH_10], [TALL], config=RewardConfig(frame=ORIGINAL_FRAME), weights={"iou": 1.0})
        assert not gc.isenabled()
    finally:
        gc.enable()


EMPTY_IMAGE = Target(present=False, category=None, boxes=[], width=100, height=100)
SAYS_NONE = '<think>none</think><answer>{"present": false, "category": null, "boxes": []}</answer>'


def test_no_object_credit():
    """A right "none" on an empty image: all -> 1 (format) + 1 (presence) + 1 (category) + 2 * 1 (IoU)
    + 1 (confidence) = 6; presence -> 1 + 1 = 2. A wrong answer there scores format alone either way, and
    a present image is untouched: 1 + 1 + 1 + 2 * 0.5 (IoU of the 10x10 box with the 10x20 one) = 4."""
    weights = {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 2.0, "confidence": 1.0}
    rows = [SAYS_NONE, MOTH_10, MOTH_10]
    targets = [EMPTY_IMAGE, EMPTY_IMAGE, TALL]
    every = score_batch(rows, targets, config=RewardConfig(frame=ORIGINAL_FRAME), weights=weights)
    once = score_batch(rows, targets, config=RewardConfig(frame=ORIGINAL_FRAME, no_object_credit="presence"),
                       weights=weights)
    assert every.totals == [6.0, 1.0, 4.0]  # the empty image's confidence is 1 as well
    assert once.totals == [2.0, 1.0, 4.0]
    assert once.components["category"] == [0.0, 0.0, 1.0]
    assert once.components["iou"] == [0.0, 0.0, pytest.approx(0.5)]
    with pytest.raises(ValueError, match="no_object_credit"):
        RewardConfig(no_object_credit="none")


def test_a_none_answer_cannot_collect_box_credit():
    """RL learnt to answer "present": false AND list a box: a free second guess while its IoU was scored
    (measured on the small model's greedy answers). On the 10x20 animal the box scores 0.5 IoU when the
    answer says present (1 + 1 + 0 + 2 * 0.5 = 3), nothing when it says none, and breaks the strict format."""
    said_present = '<think>a</think><answer>{"present": true, "category": "fish", "boxes": [[0, 0, 10, 10]]}</answer>'
    said_none = '<think>a</think><answer>{"present": false, "category": null, "boxes": [[0, 0, 10, 10]]}</answer>'
    weights = {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 2.0}
    config = RewardConfig(frame=ORIGINAL_FRAME, no_object_credit="presence")
    result = score_batch([said_present, said_none], [TALL, TALL], config=config, weights=weights)
    assert result.components["iou"] == [pytest.approx(0.5), 0.0]
    assert result.components["format"] == [1.0, 0.0]
    assert result.totals == [pytest.approx(3.0), 0.0]


def test_a_none_answer_cannot_collect_category_credit():
    """The same hedge with the category: "none" naming "moth" scored the category reward on a moth image
    (1 + 0 + 1 = 2 against the honest "none"'s 1 + 0 + 0), and on an empty image as much as the honest "none"
    (1 + 3 with presence paid 3), so it never cost anything. Now it scores as the honest "none" does in the
    lenient format and breaks the strict one; a "none" writing "category": "none" is no hedge."""
    honest = '<think>none</think><answer>{"present": false}</answer>'
    hedge = '<think>none</think><answer>{"present": false, "category": "moth"}</answer>'
    says_none = '<think>none</think><answer>{"present": false, "category": "None"}</answer>'
    empty = Target(present=False, category=None, boxes=[], width=100, height=100)
    weights = {"format": 1.0, "presence": 3.0, "category": 1.0, "iou": 2.0}
    lenient = RewardConfig(frame=ORIGINAL_FRAME, no_object_credit="presence", format_mode="lenient")
    result = score_batch([honest, hedge, says_none] * 2, [TALL] * 3 + [empty] * 3, config=lenient, weights=weights)
    assert result.components["category"] == [0.0] * 6
    assert result.totals == [1.0, 1.0, 1.0, 4.0, 4.0, 4.0]
    assert result.strict_violations == [None, "absent_with_category", None] * 2
    strict = RewardConfig(frame=ORIGINAL_FRAME, no_object_credit="presence")
    assert score_batch([hedge], [TALL], config=strict, weights=weights).totals == [0.0]
