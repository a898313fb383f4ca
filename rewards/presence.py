"""Presence (binary accuracy): did the answer say correctly whether the object is in the image?"""

from __future__ import annotations


def presence_reward(answer_present: bool | None, *, target_present: bool) -> float:
    """1.0 if the answer's presence equals the truth, else 0.0 (range {0, 1}).

    ``answer_present`` is None when the answer gave neither "present" nor boxes: that scores 0.
    """
    return 1.0 if answer_present is not None and answer_present == target_present else 0.0
