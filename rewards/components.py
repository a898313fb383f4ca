"""Reward component names (shared with curriculum and metrics), their ranges, and weight checks.

The names are part of the shared contract: "format", "presence", "category", "iou", "confidence",
"overlong"; "custom" is the optional user reward loaded from ``RewardConfig.custom_reward``.
"""

from __future__ import annotations

import math
from typing import Mapping

FORMAT = "format"
PRESENCE = "presence"
CATEGORY = "category"
IOU = "iou"
CONFIDENCE = "confidence"
OVERLONG = "overlong"
CUSTOM = "custom"

COMPONENTS = (FORMAT, PRESENCE, CATEGORY, IOU, CONFIDENCE, OVERLONG, CUSTOM)

# Documented value range of each component (iou reaches -1 only with GIoU; custom is unbounded
# by us, the worker only guarantees it is finite).
RANGES: dict[str, tuple[float, float]] = {
    FORMAT: (0.0, 1.0),
    PRESENCE: (0.0, 1.0),
    CATEGORY: (0.0, 1.0),
    IOU: (-1.0, 1.0),
    CONFIDENCE: (0.0, 1.0),
    OVERLONG: (-1.0, 0.0),
    CUSTOM: (-math.inf, math.inf),
}

# Every built-in component with weight 1, except the length penalty (it needs token counts).
DEFAULT_WEIGHTS: dict[str, float] = {FORMAT: 1.0, PRESENCE: 1.0, CATEGORY: 1.0, IOU: 1.0, CONFIDENCE: 1.0}


def check_weights(weights: Mapping[str, float], *, where: str = "weights") -> dict[str, float]:
    """A validated copy of ``{component: weight}``; raises ValueError naming an unknown or bad entry."""
    checked: dict[str, float] = {}
    for name, weight in weights.items():
        if name not in COMPONENTS:
            raise ValueError(f"unknown reward component {name!r} in {where}; known: {', '.join(COMPONENTS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight of reward component {name!r} in {where} must be a finite number, got {weight!r}")
        checked[name] = float(weight)
    return checked
