"""Category reward: normalised exact match with an optional synonym table.

Deliberately NOT Visual-RFT's ``gt in ans or ans in gt`` substring test, which gives full reward to an
empty answer (the empty string is a substring of everything) and to "moth" for "mothra".
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, Sequence

_NON_WORD_RE = re.compile(r"[\W_]+")
# Ways of saying "no category" that count as naming nothing.
_NO_CATEGORY = frozenset({"", "none", "null"})


# Names longer than this are normalised without the cache: a model's runaway "category" (up to the parser's
# max_chars) would otherwise keep up to 65,536 of them alive per reward worker.
_CACHED_NAME_CHARS = 64


def normalize_category(text: str) -> str:
    """Lower case, punctuation/underscores → spaces, whitespace collapsed, plural 's' dropped per word.

    The plural rule only strips one trailing 's' from words longer than 3 letters not ending in "ss",
    applied to both sides alike, so "Moths" == "moth" and "grass" stays "grass".
    """
    return _normalize_cached(text) if len(text) <= _CACHED_NAME_CHARS else _normalize(text)


def _normalize(text: str) -> str:
    words = _NON_WORD_RE.sub(" ", text.lower()).split()
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words)


_normalize_cached = lru_cache(maxsize=65_536)(_normalize)


def names_a_category(text: str | None) -> bool:
    """Whether ``text`` names a category at all ("", "none" and "null" name none)."""
    return text is not None and normalize_category(text) not in _NO_CATEGORY


def build_synonym_index(synonyms: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """{canonical: [synonyms]} → {normalised synonym or canonical: normalised canonical}.

    Raises ValueError naming a synonym that is listed under two different canonical names.
    """
    index: dict[str, str] = {}
    for canonical, words in synonyms.items():
        canon = normalize_category(canonical)
        for word in (canonical, *words):
            key = normalize_category(word)
            if index.get(key, canon) != canon:
                raise ValueError(f"synonym {word!r} is listed under both {index[key]!r} and {canon!r}")
            index[key] = canon
    return index


def category_reward(
    answer_category: str | None, *, target_category: str | None, synonyms: Mapping[str, str] | None = None
) -> float:
    """Range {0, 1}.

    With a true category: 1.0 iff both normalise (and map through ``synonyms``, an index from
    ``build_synonym_index``) to the same non-empty name; an empty or missing answer scores 0.
    Without one (no object, target None or empty): 1.0 iff the answer names no category
    (missing, empty, "none" or "null").
    """
    answer = normalize_category(answer_category) if answer_category is not None else ""
    target = normalize_category(target_category) if target_category is not None else ""
    if target in _NO_CATEGORY:
        return 1.0 if answer in _NO_CATEGORY else 0.0
    if not answer:
        return 0.0
    if synonyms:
        answer = synonyms.get(answer, answer)
        target = synonyms.get(target, target)
    return 1.0 if answer == target else 0.0
