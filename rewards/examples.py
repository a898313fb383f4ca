"""Example custom rewards for ``rewards.custom_reward`` ("rewards.examples:brevity").

A custom reward is a plain function ``fn(completion, *, target, parsed) -> float``, named by its
import path in the run config and imported by the reward worker (no eval, no pickle). These also give
a random-init model (which never writes the answer grammar, so every perception reward is 0) a reward
that varies within a group, which the end-to-end tests need to see real updates.
"""

from __future__ import annotations

from rewards.parse import ParsedCompletion
from rewards.types import GroundTruth

BREVITY_CHARS = 200  # completions this long or longer score 0


def brevity(completion: str, *, target: GroundTruth, parsed: ParsedCompletion) -> float:
    """1 for an empty completion, falling linearly to 0 at BREVITY_CHARS characters. Range [0, 1]."""
    return max(0.0, 1.0 - len(completion) / BREVITY_CHARS)
