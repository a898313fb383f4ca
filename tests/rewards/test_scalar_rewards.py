"""Category, presence, format and overlong rewards: hand-computed tables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rewards.category import build_synonym_index, category_reward, normalize_category
from rewards.format import format_reward
from rewards.overlong import OverlongConfig, overlong_penalty
from rewards.parse import parse_completion
from rewards.presence import presence_reward


@pytest.mark.parametrize(
    "answer, target, expected",
    [
        ("moth", "moth", 1.0),
        ("Moth", "moth", 1.0),
        ("  moths \n", "moth", 1.0),
        ("moth.", "moth", 1.0),
        ("Sea-Horse", "sea horse", 1.0),
        ("sea_horses!", "Sea Horse", 1.0),
        ("grass", "grass", 1.0),  # "ss" is not a plural
        ("crab", "moth", 0.0),
        # Visual-RFT's `gt in ans or ans in gt` would give 1.0 to all three of these.
        ("", "moth", 0.0),
        ("moth", "mothra", 0.0),
        ("a moth on bark", "moth", 0.0),
        (None, "moth", 0.0),
        ("...", "moth", 0.0),
        # No object: naming nothing is right.
        (None, None, 1.0),
        ("", None, 1.0),
        ("None", None, 1.0),
        ("null", "", 1.0),
        ("moth", None, 0.0),
    ],
)
def test_category_table(answer, target, expected):
    assert category_reward(answer, target_category=target) == expected


def test_visual_rft_substring_flaw_not_copied():
    # The flawed check: the empty answer is a substring of every category.
    assert "" in "moth"
    assert category_reward("", target_category="moth") == 0.0


@pytest.mark.parametrize(
    "answer, target, expected",
    [
        ("Millers", "moth", 1.0),
        ("moth", "miller", 1.0),
        ("lepidopteran", "miller", 1.0),
        ("crab", "miller", 0.0),
        ("flounder", "flatfish", 1.0),
    ],
)
def test_category_synonyms(answer, target, expected):
    index = build_synonym_index({"moth": ["lepidopteran", "miller"], "flatfish": ["flounder"]})
    assert category_reward(answer, target_category=target, synonyms=index) == expected


def test_synonym_listed_twice_is_rejected():
    with pytest.raises(ValueError, match="'Moths'"):
        build_synonym_index({"moth": ["miller"], "butterfly": ["Moths"]})


def test_a_runaway_category_is_normalised_without_being_cached():
    from rewards.category import _normalize_cached

    before = _normalize_cached.cache_info().currsize
    runaway = "Moths " * 5000  # a model looping inside its "category" string
    assert normalize_category(runaway) == " ".join(["moth"] * 5000)
    assert _normalize_cached.cache_info().currsize == before
    normalize_category("a name not seen before in this process")
    assert _normalize_cached.cache_info().currsize == before + 1


def test_normalize_category():
    assert normalize_category("  The   Stick-Insects! ") == "the stick insect"


@pytest.mark.parametrize(
    "answer, target, expected",
    [(True, True, 1.0), (False, False, 1.0), (False, True, 0.0), (True, False, 0.0), (None, False, 0.0)],
)
def test_presence_table(answer, target, expected):
    assert presence_reward(answer, target_present=target) == expected


@pytest.mark.parametrize(
    "text, strict, lenient",
    [
        ('<think>a</think><answer>{"present": false}</answer>', 1.0, 1.0),
        ("<think>a</think><answer>{'present': False}</answer>", 0.0, 1.0),  # repaired JSON
        ('Answer: <think>a</think><answer>{"present": false}</answer>', 0.0, 1.0),
        ('<answer>{"present": false}</answer>', 0.0, 1.0),
        ("<think>a</think><answer>no idea</answer>", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_format_table(text, strict, lenient):
    parsed = parse_completion(text, lenient=True)
    assert format_reward(parsed, strict=True) == strict
    assert format_reward(parsed, strict=False) == lenient


@pytest.mark.parametrize(
    "tokens, expected",
    [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (150, -1.0)],
)
def test_overlong_table(tokens, expected):
    # Ramp from l_max - l_cache = 80 down to -1 at 100.
    assert overlong_penalty(tokens, l_max=100, l_cache=20) == pytest.approx(expected)


def test_overlong_config_bounds():
    with pytest.raises(ValidationError, match="l_cache"):
        OverlongConfig(l_max=10, l_cache=20)
    assert OverlongConfig(l_max=20, l_cache=20).l_cache == 20


def test_example_brevity_reward_is_loadable_by_import_path_and_in_range():
    from rewards.custom import load_custom_reward

    brevity = load_custom_reward("rewards.examples:brevity")
    assert brevity("", target=None, parsed=None) == 1.0
    assert brevity("x" * 50, target=None, parsed=None) == 0.75  # 1 - 50/200
    assert brevity("x" * 500, target=None, parsed=None) == 0.0
