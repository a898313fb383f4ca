"""Small typed inputs of the reward functions.

``rewards`` imports no other package of ours, so it declares what it needs from a ground truth as a
``Protocol``: ``actors.types.Target`` satisfies it as it is (same field names), and so does the
``Target`` dataclass below, which tests, benchmarks and the JSONL scorer use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

# One box as [x1, y1, x2, y2]. In ground truths it is in ORIGINAL image pixels; in a parsed answer
# it is in the completion's frame until rewards.frames converts it.
Box = list[float]


class GroundTruth(Protocol):
    """What a reward needs to know about one prompt (read-only attributes)."""

    @property
    def present(self) -> bool: ...

    @property
    def category(self) -> str | None: ...

    @property
    def boxes(self) -> Sequence[Sequence[float]]: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


@dataclass(frozen=True)
class Target:
    """Ground truth of one prompt, boxes in ORIGINAL image pixels (the data set's frame)."""

    present: bool
    category: str | None
    boxes: list[Box]
    width: int
    height: int
