"""The brief think: the verdict first, then the category; the answer must not contradict it.

The brief grammar (``data.prompts.target_completion(think="brief")``) thinks ``present <category>``
when there is an animal and ``none`` when there is not, then answers. The verdict comes first and
alone: ``present`` and ``n`` (the first token of ``none``) are the two first tokens, so greedy decoding
answers "present" exactly when the model puts more than half its probability on it. With the category
as the first word instead, "none" competed with seven names at once and won greedy decoding on a
quarter of its probability (measured, bench.presence_ranking on the run-4 SFT model: hard presence
0.792 greedy, 0.828 at P("none") > 0.5).

Under ``RewardConfig.think_rule == "brief"`` a completion whose answer disagrees with its think loses
its answer (failure ``think_contradicts_answer``), so it scores like an unparsable one on every
component: contradicting the think can never pay more than agreeing with it. Without the rule RL learnt
to decouple the two (bench.learning run 4: the think said "none", the answer said present, on every
held-out image), so the decision the think was trained to make stopped mattering.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from rewards.category import category_reward, normalize_category
from rewards.parse import ParsedCompletion, ParseFailure

NO_ANIMAL = "none"  # the brief think of an image without an animal
PRESENT = "present"  # the first word of the brief think of an image with one


def brief_think(present: bool, category: str | None) -> str:
    """The brief think for an answer: ``present <category>`` (``present`` without one), or ``none``."""
    if not present:
        return NO_ANIMAL
    return f"{PRESENT} {category}" if category else PRESENT


def read_brief_think(think: str) -> tuple[bool, str] | None:
    """(present, normalised category or "") of a brief think; None when it is not one."""
    words = normalize_category(think).split(" ", 1)
    if words == [NO_ANIMAL]:
        return False, ""
    if words[0] == PRESENT:
        return True, words[1] if len(words) > 1 else ""
    return None


def follows_brief_think(parsed: ParsedCompletion, *, synonyms: Mapping[str, str]) -> ParsedCompletion:
    """``parsed`` itself when it has no answer or its answer agrees with its think; otherwise the same
    completion without an answer (failure and strict violation ``THINK_CONTRADICTS_ANSWER``).

    The think read is the last one (``ParsedCompletion.final_think``): after a zoom turn the model may
    revise what it thought about the whole image. A think that is not a brief think disagrees with every
    answer. Categories are compared as normalised names (``rewards.category``), synonyms mapped to their
    canonical name (``RewardConfig.synonym_index``), so a think "present Moths" agrees with the category "moth".
    """
    answer = parsed.answer
    if answer is None:
        return parsed
    said = read_brief_think(parsed.final_think)  # after a zoom, the think the answer follows
    if said is not None:
        present, category = said
        # The category the answer stands by, as the category reward reads it: an answer without a verdict
        # that names one ({"category": "moth"}) must agree with a think "none" no more than a "present" would.
        answered = answer.stated_category
        # The think names the answer's category exactly when the category reward would call it right.
        same_category = category_reward(category, target_category=answered, synonyms=synonyms) == 1.0
        if present == (answer.present is True) and same_category:
            return parsed
    contradiction = ParseFailure.THINK_CONTRADICTS_ANSWER
    return replace(parsed, answer=None, failure=contradiction, strict_violation=contradiction)
