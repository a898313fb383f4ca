"""Format reward: does the completion follow the grammar (see rewards.parse)?"""

from __future__ import annotations

from rewards.parse import ParsedCompletion


def format_reward(parsed: ParsedCompletion, *, strict: bool) -> float:
    """Range {0, 1}.

    strict: 1.0 only for a full grammar match with answer JSON that parsed without repair
    (Visual-RFT's ``<think>.*?</think>\\s*<answer>.*?</answer>`` plus valid JSON, extended to zoom
    turns). lenient: 1.0 whenever an answer could be extracted (repairs and stray text allowed).
    """
    ok = parsed.strict if strict else parsed.answer is not None
    return 1.0 if ok else 0.0
