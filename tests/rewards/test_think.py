"""rewards.think: the brief think rule, alone and through score_batch (hand-computed totals)."""

from __future__ import annotations

import pytest

from data.prompts import target_completion
from rewards.compose import score_batch
from rewards.config import RewardConfig
from rewards.parse import ParseFailure, parse_completion
from rewards.think import brief_think, follows_brief_think, read_brief_think
from rewards.types import Target

MOTH = Target(present=True, category="moth", boxes=[[0, 0, 10, 10]], width=100, height=100)
EMPTY = Target(present=False, category=None, boxes=[], width=100, height=100)
SAYS_MOTH = '{"present": true, "category": "moth", "boxes": [[0, 0, 10, 10]]}'
SAYS_NONE = '{"present": false, "category": null, "boxes": []}'
WEIGHTS = {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 2.0}


def completion(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def test_brief_think_gives_the_verdict_then_the_category():
    assert brief_think(True, "moth") == "present moth"
    assert brief_think(True, None) == "present"
    assert brief_think(False, None) == "none"
    assert brief_think(False, "moth") == "none"  # an answer saying absent thinks none, whatever it names


@pytest.mark.parametrize(
    ("think", "read"),
    [("present moth", (True, "moth")), (" Present  Stick-Insects ", (True, "stick insect")), ("present", (True, "")),
     ("none", (False, "")), ("None.", (False, "")), ("moth", None), ("none moth", None), ("", None)],
)
def test_read_brief_think(think, read):
    assert read_brief_think(think) == read


@pytest.mark.parametrize(
    ("think", "answer", "agrees"),
    [
        ("present moth", SAYS_MOTH, True),
        (" present Moths ", SAYS_MOTH, True),  # normalised: case, whitespace, plural
        ("none", SAYS_NONE, True),
        ("none", SAYS_MOTH, False),  # thinks no animal, answers one
        ("none", '{"category": "moth"}', False),  # no verdict, but a category the reward would pay
        ("none", '{"present": "unsure", "category": "moth"}', False),
        ("present moth", SAYS_NONE, False),  # thinks moth, answers none
        ("present crab", SAYS_MOTH, False),  # another category
        ("present", SAYS_MOTH, False),  # no category thought, one answered
        ("moth", SAYS_MOTH, False),  # not a brief think (the verdict is missing)
        ("", SAYS_MOTH, False),
    ],
)
def test_follows_brief_think(think, answer, agrees):
    parsed = parse_completion(completion(think, answer))
    checked = follows_brief_think(parsed, synonyms={})
    if agrees:
        assert checked is parsed
    else:
        assert checked.answer is None
        assert checked.failure is checked.strict_violation is ParseFailure.THINK_CONTRADICTS_ANSWER
        assert checked.think == parsed.think


@pytest.mark.parametrize(("first", "final", "answer", "agrees"), [
    ("present moth", "present moth", SAYS_MOTH, True),  # a zoom trace as SFT teaches it
    ("none", "present moth", SAYS_MOTH, True),  # the crop changed its mind: the final think counts
    ("present moth", "none", SAYS_MOTH, False),  # the final think says none, the answer a moth
])
def test_after_a_zoom_the_answer_follows_the_final_think(first, final, answer, agrees):
    text = f"<think>{first}</think><zoom>[1, 2, 30, 40]</zoom>" + completion(final, answer)
    parsed = parse_completion(text)
    assert parsed.strict_violation is None and parsed.final_think == final
    assert (follows_brief_think(parsed, synonyms={}) is parsed) == agrees


def test_synonyms_agree():
    config = RewardConfig(synonyms={"moth": ["lepidopteran"]})
    parsed = parse_completion(completion("present lepidopteran", SAYS_MOTH))
    assert follows_brief_think(parsed, synonyms=config.synonym_index) is parsed


def test_no_answer_is_left_alone():
    parsed = parse_completion("<think>none</think>")
    assert follows_brief_think(parsed, synonyms={}) is parsed


def test_sft_targets_follow_the_rule():
    rows = [{"present": True, "category": "moth", "boxes": [[0, 0, 10, 10]], "width": 100, "height": 100},
            {"present": False, "category": None, "boxes": [], "width": 100, "height": 100}]
    for row in rows:
        parsed = parse_completion(target_completion(row, frame="original", think="brief"))
        assert follows_brief_think(parsed, synonyms={}) is parsed


def test_contradicting_the_think_never_pays():
    """Present image, the think says none. Free: answering present anyway earns 1 + 1 + 1 + 2 * 1 = 5,
    more than the answer that agrees with the think (format 1). Brief: the contradiction scores 0."""
    contradicting, agreeing = completion("none", SAYS_MOTH), completion("none", SAYS_NONE)
    free = RewardConfig(frame={"kind": "original"})
    brief = RewardConfig(frame={"kind": "original"}, think_rule="brief")
    assert score_batch([contradicting, agreeing], [MOTH] * 2, config=free, weights=WEIGHTS).totals == [5.0, 1.0]
    result = score_batch([contradicting, agreeing], [MOTH] * 2, config=brief, weights=WEIGHTS)
    assert result.totals == [0.0, 1.0]
    assert result.failures == ["think_contradicts_answer", None]
    # Absent image, think "present moth", answer none: 1 + 1 + 1 + 2 * 1 = 5 free, 0 under the rule.
    wrong_way = completion("present moth", SAYS_NONE)
    assert score_batch([wrong_way], [EMPTY], config=free, weights=WEIGHTS).totals == [5.0]
    assert score_batch([wrong_way], [EMPTY], config=brief, weights=WEIGHTS).totals == [0.0]


def test_think_rule_is_validated():
    with pytest.raises(ValueError, match="think_rule"):
        RewardConfig(think_rule="strict")


def test_a_think_after_the_answer_does_not_speak_for_it():
    """Lenient parsing reads the answer whatever follows it; the think it follows is the one before it."""
    brief = RewardConfig(frame={"kind": "original"}, think_rule="brief")
    contradicting = completion("none", SAYS_MOTH) + "<think>present moth</think>"
    agreeing = completion("present moth", SAYS_MOTH) + "<think>none</think>"
    result = score_batch([contradicting, agreeing], [MOTH] * 2, config=brief, weights=WEIGHTS)
    assert result.failures == ["think_contradicts_answer", None]
    assert result.totals[0] == 0.0 and result.totals[1] > 0.0
