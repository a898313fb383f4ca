"""Loading the optional user reward. It is ONLY ever an explicit import path: no eval, no pickle."""

from __future__ import annotations

import importlib
from typing import Protocol

from rewards.parse import ParsedCompletion
from rewards.types import GroundTruth


class CustomReward(Protocol):
    """A user reward: called once per completion; must return a finite float (else it scores 0)."""

    def __call__(self, completion: str, *, target: GroundTruth, parsed: ParsedCompletion) -> float: ...


def load_custom_reward(path: str) -> CustomReward:
    """Import ``"package.module:function"``; raises ImportError/AttributeError/TypeError naming it."""
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    try:
        fn = getattr(module, attr)
    except AttributeError as err:
        raise AttributeError(f"custom_reward {path!r}: module {module_name!r} has no {attr!r}") from err
    if not callable(fn):
        raise TypeError(f"custom_reward {path!r} is not callable")
    return fn
