"""Weighted composition: completions + ground truths → per-component rewards and a weighted total.

This is the whole reward pipeline in one place: parse every completion, compute every component
(format, presence, category, iou, confidence; overlong when token counts are given; any extra
components such as "custom" computed by the caller), then total = sum(weight * component).
Components are always all computed, whatever their weight, so metrics can follow a component
before the curriculum turns it on. A completion without an extractable answer scores each content
component's minimum (0; IoU -1 under GIoU) and carries its parse-failure reason. Results come back as a ``RewardBatch``
(columns, cheap to send between processes); ``batch[i]`` is completion i's ``RewardBreakdown``.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from rewards.category import category_reward
from rewards.components import (
    CATEGORY,
    CONFIDENCE,
    FORMAT,
    IOU,
    OVERLONG,
    PRESENCE,
    check_weights,
)
from rewards.config import RewardConfig, check_computable
from rewards.format import format_reward
from rewards.frames import FrameSpec, affine_to_original
from rewards.iou import box_rewards_batch
from rewards.overlong import overlong_penalty
from rewards.parse import ParsedCompletion, parse_completion
from rewards.presence import presence_reward
from rewards.think import follows_brief_think
from rewards.types import GroundTruth


@dataclass(frozen=True, slots=True)
class RewardBreakdown:
    """The reward of one completion (a row of a ``RewardBatch``)."""

    total: float  # sum over components of weight * value
    components: dict[str, float]  # every computed component, weighted or not
    failure: str | None  # ParseFailure value when no answer could be extracted, else None
    strict_violation: str | None  # first strict-grammar violation (None for a strict completion)


@dataclass
class RewardBatch:
    """The rewards of a batch, stored by column.

    Columns of floats and strings cross process boundaries (Ray) several times cheaper than one
    object per completion; index or iterate it to get ``RewardBreakdown`` rows.
    """

    totals: list[float]  # weighted total per completion
    components: dict[str, list[float]]  # component name -> value per completion
    failures: list[str | None]  # ParseFailure value or None, per completion
    strict_violations: list[str | None]  # strict-grammar violation or None, per completion

    def __len__(self) -> int:
        return len(self.totals)

    def __getitem__(self, i: int) -> RewardBreakdown:
        return RewardBreakdown(
            total=self.totals[i],
            components={name: values[i] for name, values in self.components.items()},
            failure=self.failures[i],
            strict_violation=self.strict_violations[i],
        )

    def __iter__(self) -> Iterator[RewardBreakdown]:
        return (self[i] for i in range(len(self)))


def weighted_total(components: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(weight * component) over the weighted components (all of which must be present)."""
    return sum(w * components[name] for name, w in weights.items() if w != 0.0)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration of a batch.

    Scoring allocates a few small objects per completion and creates no reference cycles, so
    reference counting frees everything; meanwhile the cyclic collector's full passes over a large
    heap (Ray, numpy, pydantic loaded) were measured at ~30% of batch time. The previous state is
    restored afterwards, so nesting is harmless.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_all(completions: Sequence[str], *, config: RewardConfig) -> list[ParsedCompletion]:
    """Parse a batch under ``config``'s mode, bounds and think rule."""
    lenient = config.parse_mode == "lenient"
    max_chars, max_boxes = config.max_chars, config.max_boxes
    parsed = [parse_completion(c, lenient=lenient, max_chars=max_chars, max_boxes=max_boxes) for c in completions]
    if config.think_rule == "brief":
        synonyms = config.synonym_index
        parsed = [follows_brief_think(p, synonyms=synonyms) for p in parsed]
    return parsed


def score_batch(
    completions: Sequence[str],
    targets: Sequence[GroundTruth],
    *,
    config: RewardConfig,
    weights: Mapping[str, float],
    frames: Sequence[FrameSpec | None] | None = None,
    num_tokens: Sequence[int] | None = None,
) -> RewardBatch:
    """Parse and score a batch; see ``score_parsed``."""
    with paused_gc():
        return score_parsed(
            parse_all(completions, config=config),
            targets,
            config=config,
            weights=weights,
            frames=frames,
            num_tokens=num_tokens,
        )


def score_parsed(
    parsed: Sequence[ParsedCompletion],
    targets: Sequence[GroundTruth],
    *,
    config: RewardConfig,
    weights: Mapping[str, float],
    frames: Sequence[FrameSpec | None] | None = None,
    num_tokens: Sequence[int] | None = None,
    extra: Mapping[str, Sequence[float]] | None = None,
) -> RewardBatch:
    """Score parsed completions against their targets (row i with row i).

    frames[i]: how row i's boxes are to be read; None (or no list) means ``config.frame`` for a full
    image of the target's size. num_tokens[i]: completion length for the overlong penalty (computed
    only when given and ``config.overlong`` is set). extra: further precomputed components, e.g.
    {"custom": [...]}. Raises ValueError for mismatched lengths or a weighted component that is not
    computed (caller errors, not model errors).
    """
    n = len(parsed)
    weights = check_weights(weights)
    check_computable(config, weights, where="score weights")
    extra = dict(extra or {})
    check_weights({name: 0.0 for name in extra}, where="extra components")
    for name, values in [("targets", targets), ("frames", frames), ("num_tokens", num_tokens), *extra.items()]:
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} rows for {n} completions")
    overlong = config.overlong if num_tokens is not None else None  # the penalty needs token counts
    computed = {FORMAT, PRESENCE, CATEGORY, IOU, CONFIDENCE, *extra}
    if overlong is not None:
        computed.add(OVERLONG)
    for name, weight in weights.items():
        if weight != 0.0 and name not in computed:
            raise ValueError(f"component {name!r} is weighted but not computed (pass its inputs)")

    answers = [p.answer for p in parsed]
    iou, confidence = box_rewards_batch(
        [a.detections if a is not None else None for a in answers],
        [t.boxes for t in targets],
        confidences=[a.confidences if a is not None else None for a in answers],
        affines=_affines(targets, frames, config),
        widths=[t.width for t in targets],
        heights=[t.height for t in targets],
        config=config.iou,
    )
    strict_format = config.format_mode == "strict"
    synonyms = config.synonym_index
    components: dict[str, list[float]] = {
        FORMAT: [format_reward(p, strict=strict_format) for p in parsed],
        PRESENCE: [
            presence_reward(a.present, target_present=t.present) if a is not None else 0.0
            for a, t in zip(answers, targets)
        ],
        CATEGORY: [
            category_reward(a.stated_category, target_category=t.category, synonyms=synonyms) if a is not None else 0.0
            for a, t in zip(answers, targets)
        ],
        IOU: iou.tolist(),
        CONFIDENCE: confidence.tolist(),
    }
    if config.no_object_credit == "presence":
        # An empty image is a yes/no question: its presence reward already pays for the right answer.
        for row, target in enumerate(targets):
            if not target.present:
                for name in (CATEGORY, IOU, CONFIDENCE):
                    components[name][row] = 0.0
    if overlong is not None and num_tokens is not None:
        l_max, l_cache = overlong.l_max, overlong.l_cache
        components[OVERLONG] = [overlong_penalty(t, l_max=l_max, l_cache=l_cache) for t in num_tokens]
    for name, values in extra.items():
        components[name] = [float(v) for v in values]
    totals = np.zeros(n)
    for name, weight in weights.items():
        if weight != 0.0:
            totals += weight * np.asarray(components[name], dtype=np.float64)
    return RewardBatch(
        totals=totals.tolist(),
        components=components,
        failures=[p.failure.value if p.failure is not None else None for p in parsed],
        strict_violations=[p.strict_violation.value if p.strict_violation is not None else None for p in parsed],
    )


def _affines(
    targets: Sequence[GroundTruth], frames: Sequence[FrameSpec | None] | None, config: RewardConfig
) -> list[tuple[float, float, float, float]]:
    """Per row (sx, sy, ox, oy) mapping answer boxes to original pixels (cached per image size)."""
    cache: dict[tuple[int, int], tuple[float, float, float, float]] = {}
    out = []
    for i, t in enumerate(targets):
        frame = frames[i] if frames is not None else None
        if frame is not None:
            out.append(affine_to_original(frame, width=t.width, height=t.height))
            continue
        key = (t.width, t.height)
        affine = cache.get(key)
        if affine is None:
            spec = config.frame.spec(width=t.width, height=t.height)
            affine = cache[key] = affine_to_original(spec, width=t.width, height=t.height)
        out.append(affine)
    return out
