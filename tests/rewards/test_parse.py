"""rewards.parse: grammar, failure reasons, tolerated model quirks and bounds."""

from __future__ import annotations

import pytest

from rewards.parse import Answer, ParseFailure, parse_completion

F = ParseFailure
GOOD = '<think>bark texture</think><answer>{"present": true, "category": "moth", "boxes": [[1, 2, 3, 4]]}</answer>'
MOTH = Answer(present=True, category="moth", boxes=[[1.0, 2.0, 3.0, 4.0]], confidences=None)


@pytest.mark.parametrize(
    "text, answer, strict_violation, repaired",
    [
        (GOOD, MOTH, None, False),
        # Whitespace around and between tags is part of the grammar.
        (
            '\n <think> a </think>\n\n <answer>\n {"present": true, "category": "moth", "boxes": [[1,2,3,4]]} \n</answer>\n',
            MOTH,
            None,
            False,
        ),
        # A single flat box is one box; valid JSON, so not a repair.
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [1, 2, 3, 4]}</answer>',
            MOTH,
            None,
            False,
        ),
        # No object.
        (
            '<think>a</think><answer>{"present": false, "category": null, "boxes": []}</answer>',
            Answer(present=False, category=None, boxes=[], confidences=None),
            None,
            False,
        ),
        # Single quotes and Python literals (what models trained on Python emit).
        (
            "<think>a</think><answer>{'present': True, 'category': 'moth', 'boxes': [[1, 2, 3, 4]]}</answer>",
            MOTH,
            None,
            True,
        ),
        # Python's repr quotes a string holding an apostrophe in double quotes: mixed quoting, read as such.
        (
            """<think>a</think><answer>{'present': True, 'category': "moth's wing", 'boxes': [[1, 2, 3, 4]]}"""
            "</answer>",
            Answer(present=True, category="moth's wing", boxes=[[1.0, 2.0, 3.0, 4.0]], confidences=None),
            None,
            True,
        ),
        (
            """<think>a</think><answer>{'present': True, 'category': 'say "moth"', 'boxes': [[1, 2, 3, 4]]}"""
            "</answer>",
            Answer(present=True, category='say "moth"', boxes=[[1.0, 2.0, 3.0, 4.0]], confidences=None),
            None,
            True,
        ),
        # Trailing commas.
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[1, 2, 3, 4],],}</answer>',
            MOTH,
            None,
            True,
        ),
        # Code fences inside the answer.
        (
            '<think>a</think><answer>```json\n{"present": true, "category": "moth", "boxes": [[1,2,3,4]]}\n```</answer>',
            MOTH,
            None,
            True,
        ),
        # Cut by the length limit inside the second box: the complete first box is kept.
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[1, 2, 3, 4], [5, 6,',
            MOTH,
            F.UNCLOSED_TAG,
            True,
        ),
        # Cut right after a member's value.
        (
            '<think>a</think><answer>{"present": false',
            Answer(present=False, category=None, boxes=[], confidences=None),
            F.UNCLOSED_TAG,
            True,
        ),
        # Text outside the tags (lenient reads through it).
        ("Sure! " + GOOD + " Hope this helps.", MOTH, F.TEXT_OUTSIDE_TAGS, False),
        # No think block at all.
        ('<answer>{"present": true, "category": "moth", "boxes": [[1,2,3,4]]}</answer>', MOTH, F.NO_THINK_TAG, False),
        # Two answers: the last closed one counts.
        (
            '<think>a</think><answer>{"present": false}</answer><answer>{"present": true, "category": "moth", "boxes": [[1,2,3,4]]}</answer>',
            MOTH,
            F.BAD_STRUCTURE,
            False,
        ),
        # Qwen2.5-VL's native grounding objects, with per-item confidences.
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [{"bbox_2d": [1,2,3,4], "confidence": 0.7}]}</answer>',
            Answer(present=True, category="moth", boxes=[[1.0, 2.0, 3.0, 4.0]], confidences=[0.7]),
            None,
            False,
        ),
        # Presence inferred from boxes when the field is missing; "yes" read as true.
        (
            '<think>a</think><answer>{"boxes": []}</answer>',
            Answer(present=False, category=None, boxes=[], confidences=None),
            None,
            False,
        ),
        (
            '<think>a</think><answer>{"present": "yes", "category": " moth "}</answer>',
            Answer(present=True, category="moth", boxes=[], confidences=None),
            None,
            False,
        ),
        # A null box field does not hide a box given under another name; null alone is no box.
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": null, "bbox_2d": [1, 2, 3, 4]}'
            '</answer>',
            MOTH,
            None,
            False,
        ),
        (
            '<think>a</think><answer>{"category": null, "boxes": null}</answer>',
            Answer(present=False, category=None, boxes=[], confidences=None),
            None,
            False,
        ),
        # Confidences that do not fit the boxes are dropped, the answer kept.
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[1,2,3,4]], "confidences": [0.5, 0.5]}</answer>',
            MOTH,
            None,
            False,
        ),
        (
            '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[1,2,3,4]], "confidences": [90]}</answer>',
            MOTH,
            None,
            False,
        ),
    ],
)
def test_answers_extracted(text, answer, strict_violation, repaired):
    parsed = parse_completion(text, lenient=True)
    assert parsed.failure is None
    assert parsed.answer == answer
    assert parsed.strict_violation == strict_violation
    assert parsed.json_repaired == repaired
    assert parsed.strict == (strict_violation is None and not repaired)


@pytest.mark.parametrize(
    "text, lenient_failure, strict_failure",
    [
        ("", F.EMPTY, F.EMPTY),
        ("  \n\t ", F.EMPTY, F.EMPTY),
        (None, F.EMPTY, F.EMPTY),
        (b"<think>", F.EMPTY, F.EMPTY),
        ("just some words", F.NO_ANSWER_TAG, F.NO_ANSWER_TAG),
        ("<think>still thinking", F.NO_ANSWER_TAG, F.NO_ANSWER_TAG),
        ("<think>a</think>", F.NO_ANSWER_TAG, F.NO_ANSWER_TAG),
        ("<think>a</think><zoom>[1, 2, 3, 4]</zoom>", F.NO_ANSWER_TAG, F.NO_ANSWER_TAG),
        ("<think>a</think><answer>moth</answer>", F.BAD_JSON, F.BAD_JSON),
        ("<think>a</think><answer>[1, 2, 3, 4]</answer>", F.BAD_JSON, F.BAD_JSON),
        ("<think>a</think><answer></answer>", F.BAD_JSON, F.BAD_JSON),
        ('<think>a</think><answer>{"boxes": [[1, 2, 3]]}</answer>', F.BAD_BOX, F.BAD_BOX),
        ('<think>a</think><answer>{"boxes": [[1, 2, "x", 4]]}</answer>', F.BAD_BOX, F.BAD_BOX),
        ('<think>a</think><answer>{"boxes": [[1, 2, NaN, 4]]}</answer>', F.BAD_BOX, F.BAD_BOX),
        ('<think>a</think><answer>{"boxes": [[true, 2, 3, 4]]}</answer>', F.BAD_BOX, F.BAD_BOX),
        ('<think>a</think><answer>{"boxes": [[1, 2, 1e999, 4]]}</answer>', F.BAD_BOX, F.BAD_BOX),
        ('<think>a</think><answer>{"boxes": "1,2,3,4"}</answer>', F.BAD_BOX, F.BAD_BOX),
        ('<think>a</think><answer>{"boxes": [[' + "1" * 400 + ", 2, 3, 4]]}</answer>", F.BAD_BOX, F.BAD_BOX),
        ("<think>a<answer>{}</answer></think>", None, F.BAD_STRUCTURE),
    ],
)
def test_failures(text, lenient_failure, strict_failure):
    assert parse_completion(text, lenient=True).failure == lenient_failure
    strict = parse_completion(text, lenient=False)
    assert strict.failure == strict_failure
    assert (strict.answer is None) == (strict_failure is not None)


@pytest.mark.parametrize(
    "text, violation",
    [
        ("Sure! " + GOOD, F.TEXT_OUTSIDE_TAGS),
        (GOOD + " done", F.TEXT_OUTSIDE_TAGS),
        ('<think>a</think> so <answer>{"present": true}</answer>', F.TEXT_OUTSIDE_TAGS),
        ('<answer>{"present": true}</answer>', F.NO_THINK_TAG),
        ('<think>a</think><answer>{"present": true}', F.UNCLOSED_TAG),
        ('<think>a</think><think>b</think><answer>{"present": true}</answer>', F.BAD_STRUCTURE),
        ('<think>a</think><answer>{"present": true}</answer><think>b</think>', F.BAD_STRUCTURE),
        ('<think>a</think><zoom>[1, 2]</zoom><think>b</think><answer>{"present": true}</answer>', F.BAD_BOX),
    ],
)
def test_strict_mode_refuses_grammar_violations(text, violation):
    lenient = parse_completion(text, lenient=True)
    assert lenient.answer is not None and lenient.strict_violation == violation
    strict = parse_completion(text, lenient=False)
    assert strict.answer is None and strict.failure == violation


def test_multi_turn_zoom_and_focus_boxes():
    text = (
        "<think>overview <focus>[10, 20, 30, 40]</focus> look closer</think>\n<zoom>[0, 0, 50, 50]</zoom>\n"
        '<think>rethink <focus>[[1.5, 2, 3, 4]]</focus></think><answer>{"present": true, "category": "crab", '
        '"boxes": [[5, 5, 9, 9]]}</answer>'
    )
    parsed = parse_completion(text, lenient=False)
    assert parsed.failure is None and parsed.strict
    assert parsed.zoom_boxes == [[0.0, 0.0, 50.0, 50.0]]
    assert parsed.focus_boxes == [[10.0, 20.0, 30.0, 40.0], [1.5, 2.0, 3.0, 4.0]]
    assert parsed.think == "overview <focus>[10, 20, 30, 40]</focus> look closer\nrethink <focus>[[1.5, 2, 3, 4]]</focus>"
    assert parsed.answer == Answer(present=True, category="crab", boxes=[[5.0, 5.0, 9.0, 9.0]], confidences=None)


def test_confidences_parallel_to_boxes():
    text = '<think>a</think><answer>{"present": true, "category": "x", "boxes": [[1,2,3,4],[5,6,7,8]], "confidences": [0.9, 0]}</answer>'
    assert parse_completion(text).answer.confidences == [0.9, 0.0]


def test_bounds_make_adversarial_input_cheap():
    many = "[" + ",".join(["[1,2,3,4]"] * 101) + "]"
    text = f'<think>a</think><answer>{{"present": true, "boxes": {many}}}</answer>'
    assert parse_completion(text, max_boxes=100).failure == F.TOO_MANY_BOXES
    assert len(parse_completion(text, max_boxes=101).answer.boxes) == 101
    assert parse_completion("x" * 40_000, max_chars=32_768).failure == F.TOO_LONG
    # Worst cases inside the size bound: deep nesting, thousands of tags, a huge unclosed answer.
    cases = [
        ("<think>a</think><answer>" + "[" * 30_000, F.BAD_JSON),
        ("<think>a</think><answer>" + "{" * 15_000 + "}" * 15_000 + "</answer>", F.BAD_JSON),
        ("<think>" * 4_000, F.NO_ANSWER_TAG),
        ('<think>a</think><answer>{"boxes": [' + "[1,2,3,4]," * 3_000, F.TOO_MANY_BOXES),
        ("<focus>[1,2,3,4]</focus>" * 1_300, F.NO_ANSWER_TAG),
        ("<think>a</think><answer>{" + "'a" * 15_000 + "</answer>", F.BAD_JSON),
    ]
    for text, failure in cases:
        parsed = parse_completion(text, max_chars=32_768, max_boxes=100)
        assert parsed.failure == failure
        assert len(parsed.focus_boxes) <= 100


def test_too_many_boxes_in_truncated_list():
    text = '<think>a</think><answer>{"present": true, "boxes": [' + "[1,2,3,4]," * 300
    parsed = parse_completion(text, max_boxes=100)
    assert parsed.failure == F.TOO_MANY_BOXES


def test_a_parser_bug_is_reported_not_raised(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    # The internal parser is replaced to simulate a bug: no real input is known to trigger one.
    monkeypatch.setattr("rewards.parse._parse", broken)
    parsed = parse_completion(GOOD)
    assert parsed.answer is None and parsed.failure == F.INTERNAL_ERROR
    assert "parser bug" in caplog.text


def test_an_absent_verdict_with_boxes_keeps_its_boxes_out_of_the_detections():
    text = '<think>none</think><answer>{"present": false, "category": null, "boxes": [[1, 2, 3, 4]]}</answer>'
    lenient = parse_completion(text, lenient=True)
    assert lenient.strict_violation == F.ABSENT_WITH_BOXES and not lenient.strict
    assert lenient.answer.present is False and lenient.answer.boxes == [[1.0, 2.0, 3.0, 4.0]]
    assert lenient.answer.detections == []
    strict = parse_completion(text, lenient=False)
    assert strict.answer is None and strict.failure == F.ABSENT_WITH_BOXES
    # A present verdict, or none at all (boxes alone decide presence), stands by its boxes.
    assert parse_completion(GOOD).answer.detections == [[1.0, 2.0, 3.0, 4.0]]
    boxes_only = parse_completion('<think>a</think><answer>{"boxes": [[1, 2, 3, 4]]}</answer>')
    assert boxes_only.strict and boxes_only.answer.detections == [[1.0, 2.0, 3.0, 4.0]]


@pytest.mark.parametrize("category, violation", [
    ('"moth"', F.ABSENT_WITH_CATEGORY), ('" Moths "', F.ABSENT_WITH_CATEGORY),
    ('null', None), ('""', None), ('"none"', None), ('"NULL"', None),
])
def test_an_absent_verdict_naming_a_category_stands_by_none(category, violation):
    text = f'<think>none</think><answer>{{"present": false, "category": {category}}}</answer>'
    lenient = parse_completion(text, lenient=True)
    assert lenient.strict_violation == violation
    assert lenient.answer.present is False and lenient.answer.stated_category is None
    strict = parse_completion(text, lenient=False)
    assert (strict.failure, strict.answer is None) == (violation, violation is not None)


def test_a_present_verdict_or_none_at_all_stands_by_its_category():
    assert parse_completion(GOOD).answer.stated_category == "moth"
    unstated = parse_completion('<think>a</think><answer>{"category": "moth"}</answer>')
    assert unstated.answer.present is None and unstated.answer.stated_category == "moth"


CUT = '<think>a</think><answer>{"present": true, "boxes": [{"bbox_2d": [1, 2, 3, 4]'


@pytest.mark.parametrize("tail", [
    "}, {",  # cut inside the next box item: closing it there gives a box with no coordinates
    ', "confidence": 0.9}, {"confidence": 0.8',  # cut inside an item before its box
    '}, {"bbox_2d": [5, 6',  # cut inside the next box's coordinates
])
def test_a_cut_answer_keeps_its_complete_boxes(tail):
    parsed = parse_completion(CUT + tail)
    assert parsed.failure is None and parsed.json_repaired
    assert parsed.answer.present is True and parsed.answer.boxes == [[1.0, 2.0, 3.0, 4.0]]


def test_a_cut_answer_whose_only_box_is_half_written_keeps_what_came_before_it():
    parsed = parse_completion('<think>a</think><answer>{"present": true, "boxes": [{"confidence": 0.8')
    assert parsed.failure is None and parsed.answer.present is True and parsed.answer.boxes == []


@pytest.mark.parametrize("cut_tag", ["", "<", "</", "</ans", "</answer"])
def test_an_answer_cut_inside_its_closing_tag_is_read(cut_tag):
    parsed = parse_completion('<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[1, 2, 3, 4]]}'
                              + cut_tag)
    assert parsed.answer == MOTH and parsed.failure is None
    assert parsed.strict_violation == F.UNCLOSED_TAG and not parsed.json_repaired


def test_the_final_think_is_the_last_before_the_answer():
    answer = '<answer>{"present": true, "category": "moth", "boxes": [[1, 2, 3, 4]]}</answer>'
    assert parse_completion("<think>one</think><think>two</think>" + answer).final_think == "two"
    after = parse_completion("<think>before</think>" + answer + "<think>after</think>")
    assert after.answer == MOTH and after.final_think == "before"
    assert parse_completion(answer + "<think>after</think>").final_think == ""
    assert parse_completion("<think>x</think><think>last</think>").final_think == "last"  # no answer
