"""The brief think rule: the think states the verdict, the answer must not contradict it.

The brief grammar (``data.prompts.target_completion(think="brief")``) thinks one word: the animal's
category, or ``none`` when there is no animal, then answers. Without a rule tying the two, RL learnt
to decouple them (measured, bench.learning run 4: the think began "none", the answer said present, on
every held-out image), so the decision that the think was trained to make stopped mattering. Under
``RewardConfig.think_rule == "brief"`` a completion whose answer disagrees with its think loses its
answer (failure ``think_contradicts_answer``), so it scores like an unparsable one on every component:
contradicting the think can never pay more than agreeing with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from rewards.category import normalize_category
from rewards.parse import ParsedCompletion, ParseFailure

NO_ANIMAL = "none"  # the brief think of an image without an animal


def brief_think(present: bool, category: str | None) -> str:
    """The brief think for an answer: its category when it says present with one, else ``none``."""
    return category if present and category else NO_ANIMAL


def follows_brief_think(parsed: ParsedCompletion, *, synonyms: Mapping[str, str]) -> ParsedCompletion:
    """``parsed`` itself when it has no answer or its answer agrees with its think; otherwise the same
    completion without an answer (failure and strict violation ``THINK_CONTRADICTS_ANSWER``).

    Agreement compares normalised names (``rewards.category``), synonyms mapped to their canonical name
    (``RewardConfig.synonym_index``), so a think "Moths" agrees with the category "moth".
    """
    answer = parsed.answer
    if answer is None:
        return parsed

    def canonical(text: str) -> str:
        name = normalize_category(text)
        return synonyms.get(name, name)

    if canonical(parsed.think) == canonical(brief_think(answer.present is True, answer.category)):
        return parsed
    return ParsedCompletion(
        answer=None,
        failure=ParseFailure.THINK_CONTRADICTS_ANSWER,
        strict_violation=ParseFailure.THINK_CONTRADICTS_ANSWER,
        json_repaired=parsed.json_repaired,
        think=parsed.think,
        focus_boxes=parsed.focus_boxes,
        zoom_boxes=parsed.zoom_boxes,
    )
