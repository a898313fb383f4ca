"""RewardWorker: scores batches of completions with ``rewards`` and counts what went wrong.

A plain class (no ray import here): the driver wraps it with ``ray.remote(RewardWorker)``, tests use
it directly. Through Ray, call ``score_request`` with a ``ScoreRequest`` (built by
``ScoreRequest.from_rows``) and large batches: the per-call overhead of an actor is fixed, the scoring
cost per completion is ~15 microseconds. Requests and results cross the actor boundary by column
(an Arrow string array, numpy arrays): a few buffers to copy instead of ~10k Python objects to pickle.

Boxes of a final answer are read in the frame its caller gives per completion; None is the configured frame
of the FULL image (``RewardConfig.frame``). After a zoom the answer is in the last crop's frame (the
environment tells the model so): the driver passes ``actors.env.answer_frame`` of each trajectory.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from actors.types import Target, TrajectoryGroup
from rewards.components import COMPONENTS, CUSTOM
from rewards.compose import RewardBatch, parse_all, paused_gc, score_parsed
from rewards.config import RewardConfig
from rewards.custom import load_custom_reward
from rewards.frames import FRAME_KINDS, FrameSpec
from rewards.parse import ParseFailure, ParsedCompletion
from rewards.types import GroundTruth

logger = logging.getLogger(__name__)

# Metric names of ``RewardWorker.stats()`` (counts and means since the last reset).
STAT_SCORED = "reward/scored"  # completions scored
STAT_SECONDS = "reward/seconds"  # wall time spent inside score()
STAT_CPU_SECONDS = "reward/cpu_seconds"  # CPU time of that (wall minus waiting for a busy machine)
STAT_STRICT_VIOLATIONS = "reward/strict_violations"  # completions not following the strict grammar
STAT_CUSTOM_ERRORS = "reward/custom_errors"  # custom reward raised or returned a non-finite value
STAT_TOTAL = "reward/total"  # mean weighted total
PARSE_FAILURE_STATS = {reason.value: f"reward/parse_failure/{reason.value}" for reason in ParseFailure}
COMPONENT_STATS = {name: f"reward/{name}" for name in COMPONENTS}  # mean of each component

# Codes of ``RewardColumns.failures`` / ``strict_violations``: index into this table (0: none). Both
# ends of a call run this same module, so the table itself never travels.
REASON_CODES: tuple[str | None, ...] = (None, *(reason.value for reason in ParseFailure))
_CODE_OF_REASON = {reason: code for code, reason in enumerate(REASON_CODES)}


@dataclass
class TargetColumns:
    """Distinct ground truths of a request, by column (the samples of a group share one target)."""

    present: np.ndarray  # bool [t]
    category: np.ndarray  # int32 [t]: index into ``categories``, -1 for None
    categories: list[str]  # the distinct category names
    width: np.ndarray  # int64 [t], original pixels
    height: np.ndarray  # int64 [t]
    box_offsets: np.ndarray  # int64 [t + 1]: target k's boxes are boxes[box_offsets[k]:box_offsets[k + 1]]
    boxes: np.ndarray  # float64 [b, 4]: [x1, y1, x2, y2] in original pixels

    @classmethod
    def of(cls, targets: Sequence[GroundTruth]) -> TargetColumns:
        """Columns of ``targets`` (in order); raises ValueError for a box that is not 4 numbers."""
        names: dict[str, int] = {}
        category = [-1 if t.category is None else names.setdefault(t.category, len(names)) for t in targets]
        flat = [box for t in targets for box in t.boxes]
        try:
            boxes = np.array(flat, dtype=np.float64) if flat else np.zeros((0, 4))
        except ValueError as err:  # ragged lists
            raise ValueError(f"target boxes must be [x1, y1, x2, y2] lists of numbers: {err}") from None
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"target boxes must be [x1, y1, x2, y2] lists, got an array of shape {boxes.shape}")
        counts = np.fromiter((len(t.boxes) for t in targets), dtype=np.int64, count=len(targets))
        return cls(
            present=np.array([t.present for t in targets], dtype=bool),
            category=np.array(category, dtype=np.int32),
            categories=list(names),
            width=np.array([t.width for t in targets], dtype=np.int64),
            height=np.array([t.height for t in targets], dtype=np.int64),
            box_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            boxes=boxes,
        )

    def to_targets(self) -> list[Target]:
        """One ``Target`` per column entry (boxes as float lists)."""
        boxes, offsets = self.boxes.tolist(), self.box_offsets.tolist()
        names = [*self.categories, None]  # category -1 picks the None at the end
        categories = [names[c] for c in self.category.tolist()]
        split = [boxes[start:end] for start, end in zip(offsets, offsets[1:])]
        # Positional arguments through map (a third cheaper than keyword calls; this runs on the actor's
        # thread), in the field order of actors.types.Target, which the round-trip tests pin.
        return list(map(Target, self.present.tolist(), categories, split, self.width.tolist(), self.height.tolist()))


@dataclass
class FrameColumns:
    """Explicit answer frames of a request's rows, by column.

    Missing values are NaN: an int input size is exact in float64, and a crop is never NaN
    (``FrameSpec`` rejects one, since NaN fails its x2 > x1 check).
    """

    kind: np.ndarray  # int8 [n]: index into FRAME_KINDS, -1 where the row has no frame (config frame)
    input_size: np.ndarray  # float64 [n, 2]: input_width, input_height; NaN for None
    crop: np.ndarray  # float64 [n, 4]: crop in original pixels; NaN for None

    @classmethod
    def of(cls, frames: Sequence[FrameSpec | None]) -> FrameColumns:
        """Columns of ``frames`` (None: the row uses the config frame)."""
        code = {kind: k for k, kind in enumerate(FRAME_KINDS)}
        nan, no_crop = math.nan, (math.nan,) * 4
        kind, size, crop = [], [], []
        for frame in frames:  # Python lists filled once: per-element numpy stores cost ~1 us each
            if frame is None:
                kind.append(-1)
                size.append((nan, nan))
                crop.append(no_crop)
                continue
            kind.append(code[frame.kind])
            width, height = frame.input_width, frame.input_height
            size.append((nan if width is None else width, nan if height is None else height))
            crop.append(no_crop if frame.crop is None else frame.crop)
        return cls(
            kind=np.array(kind, dtype=np.int8),
            input_size=np.array(size, dtype=np.float64).reshape(-1, 2),
            crop=np.array(crop, dtype=np.float64).reshape(-1, 4),
        )

    def to_frames(self) -> list[FrameSpec | None]:
        """The frames back: ``FrameSpec`` per row, None where the row had none."""
        isnan = math.isnan
        out: list[FrameSpec | None] = []
        rows = zip(self.kind.tolist(), self.input_size.tolist(), self.crop.tolist())
        for k, (width, height), (x1, y1, x2, y2) in rows:
            if k < 0:
                out.append(None)
                continue
            # Positional, in FrameSpec's field order (pinned by the round-trip tests): this loop runs on
            # the actor's thread, ~1 us per zoomed row.
            out.append(FrameSpec(
                FRAME_KINDS[k],
                None if isnan(width) else int(width),
                None if isnan(height) else int(height),
                None if isnan(x1) else (x1, y1, x2, y2),
            ))
        return out


@dataclass
class ScoreRequest:
    """One batch for ``RewardWorker.score_request``: the arguments of ``score``, by column.

    Build it with ``from_rows``. Why columns: Ray pickles call arguments, and ~10k objects per batch
    (8192 str completions, 2048 Target dataclasses and their box lists) cost a round trip to an idle
    actor 20-22 ms per 8192-completion batch, measured here (scoring it takes ~115 ms); as an Arrow
    string array plus numpy columns, 10-12 ms, ``from_rows`` included. Arrow and numpy arrays travel
    as out-of-band buffers; the actor rebuilds the strings with ``to_pylist`` (0.6 ms, cheaper than
    unpickling them or splitting one joined string) and the distinct targets (1.2 ms).
    """

    # large_string [n]; large_binary of surrogate-passing UTF-8 where a text is not valid Unicode
    completions: pa.Array
    target_index: np.ndarray  # int64 [n]: row -> entry of ``targets``
    targets: TargetColumns  # distinct targets
    weights: dict[str, float]
    frames: FrameColumns | None = None  # None: RewardConfig.frame for every row
    num_tokens: np.ndarray | None = None  # int64 [n]: completion lengths, for the overlong penalty

    @classmethod
    def from_rows(
        cls,
        completions: Sequence[str],
        targets: Sequence[GroundTruth],
        *,
        weights: Mapping[str, float],
        frames: Sequence[FrameSpec | None] | None = None,
        num_tokens: Sequence[int] | None = None,
    ) -> ScoreRequest:
        """The request for ``score``'s arguments (row i: completion i, targets[i], ...).

        Targets are stored once per distinct object (a group's samples share one). Frames that are all
        None are dropped (the config frame applies). Raises ValueError for mismatched lengths or
        non-integer token counts.
        """
        n = len(completions)
        for name, values in (("targets", targets), ("frames", frames), ("num_tokens", num_tokens)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} rows for {n} completions")
        by_id = {id(t): t for t in targets}  # first-seen order; every target is alive, so ids are unique
        position = {key: k for k, key in enumerate(by_id)}
        counts = None
        if num_tokens is not None:
            counts = np.asarray(num_tokens) if n else np.zeros(0, dtype=np.int64)
            if counts.dtype.kind not in "iu":  # a cast would truncate 3.5 silently
                raise ValueError(f"num_tokens must be integers, got dtype {counts.dtype}")
            counts = counts.astype(np.int64)
        return cls(
            completions=_text_array(completions),
            target_index=np.fromiter(map(position.__getitem__, map(id, targets)), dtype=np.int64, count=n),
            targets=TargetColumns.of(list(by_id.values())),
            weights=dict(weights),
            frames=FrameColumns.of(frames) if frames is not None and any(f is not None for f in frames) else None,
            num_tokens=counts,
        )

    def __len__(self) -> int:
        return len(self.completions)

    def completion_texts(self) -> list[str]:
        """The completions, exactly as given to ``from_rows``."""
        if pa.types.is_large_binary(self.completions.type):
            return [b.decode("utf-8", "surrogatepass") for b in self.completions.to_pylist()]
        return self.completions.to_pylist()

    def target_rows(self) -> list[Target]:
        """The target of every row (rows of a group share one object, as sent)."""
        distinct = self.targets.to_targets()
        return [distinct[k] for k in self.target_index.tolist()]

    def frame_rows(self) -> list[FrameSpec | None] | None:
        """Per row, its explicit frame or None; None alone when no row has one."""
        return self.frames.to_frames() if self.frames is not None else None

    def token_counts(self) -> list[int] | None:
        """Per row, the completion length in tokens (None when not given)."""
        return self.num_tokens.tolist() if self.num_tokens is not None else None


def _text_array(texts: Sequence[str]) -> pa.Array:
    """Texts as an Arrow large_string array, or (only if some text holds a lone surrogate, which UTF-8
    cannot encode but a Python str and pickle can) as large_binary of surrogate-passing UTF-8."""
    try:
        return pa.array(texts, type=pa.large_string())
    except UnicodeEncodeError:
        return pa.array([t.encode("utf-8", "surrogatepass") for t in texts], type=pa.large_binary())


@dataclass
class RewardColumns:
    """A ``RewardBatch`` as numpy columns: what ``score_request`` returns through Ray.

    A few buffers instead of ~60k floats and strings: the result leg of a round trip to an idle actor
    was measured here at 2.1 ms instead of 4.7 ms per 8192 rows. Converting (``of`` on the actor,
    ``to_batch`` on the driver) costs about the CPU that pickling the lists did; the gain is in Ray's
    handling of one large in-band pickle. ``to_batch()`` gives the ``RewardBatch`` back exactly.
    """

    totals: np.ndarray  # float64 [n]
    components: dict[str, np.ndarray]  # component name -> float64 [n]
    failures: np.ndarray  # int8 [n]: index into REASON_CODES (0: an answer was extracted)
    strict_violations: np.ndarray  # int8 [n]: index into REASON_CODES (0: strict completion)

    @classmethod
    def of(cls, batch: RewardBatch) -> RewardColumns:
        """The columns of ``batch`` (failure reasons as REASON_CODES indices)."""
        n = len(batch)
        return cls(
            totals=np.array(batch.totals, dtype=np.float64),
            components={name: np.array(values, dtype=np.float64) for name, values in batch.components.items()},
            failures=np.fromiter(map(_CODE_OF_REASON.__getitem__, batch.failures), dtype=np.int8, count=n),
            strict_violations=np.fromiter(
                map(_CODE_OF_REASON.__getitem__, batch.strict_violations), dtype=np.int8, count=n
            ),
        )

    def __len__(self) -> int:
        return len(self.totals)

    def to_batch(self) -> RewardBatch:
        """The ``RewardBatch`` these columns came from, equal to it value for value."""
        return RewardBatch(
            totals=self.totals.tolist(),
            components={name: values.tolist() for name, values in self.components.items()},
            failures=[REASON_CODES[c] for c in self.failures.tolist()],
            strict_violations=[REASON_CODES[c] for c in self.strict_violations.tolist()],
        )


class RewardWorker:
    """Scores completions against targets; keeps failure counts and component means."""

    def __init__(self, config: RewardConfig) -> None:
        self._config = config
        # Imported here, at worker start, never earlier: a bad path fails the worker loudly.
        self._custom = load_custom_reward(config.custom_reward) if config.custom_reward else None
        self._reset()

    def score(
        self,
        completions: Sequence[str],
        targets: Sequence[Target],
        *,
        weights: Mapping[str, float],
        frames: Sequence[FrameSpec | None] | None = None,
        num_tokens: Sequence[int] | None = None,
    ) -> RewardBatch:
        """Rewards of the batch, by column; ``result[i]`` is completion i's ``RewardBreakdown``.

        Arguments as in rewards.compose.score_parsed.
        """
        start, start_cpu = time.perf_counter(), time.thread_time()
        with paused_gc():
            parsed = parse_all(completions, config=self._config)
            extra = None
            if self._custom is not None:
                extra = {CUSTOM: [self._custom_value(c, t, p) for c, t, p in zip(completions, targets, parsed)]}
            out = score_parsed(
                parsed,
                targets,
                config=self._config,
                weights=weights,
                frames=frames,
                num_tokens=num_tokens,
                extra=extra,
            )
        self._record(out, time.perf_counter() - start, time.thread_time() - start_cpu)
        return out

    def score_request(self, request: ScoreRequest) -> RewardColumns:
        """``score`` with its arguments and result by column (the cheap way to call it through Ray);
        ``merge_batches`` turns results back into a ``RewardBatch``."""
        with paused_gc():  # unpacking builds thousands of small objects; see paused_gc for why
            batch = self.score(
                request.completion_texts(),
                request.target_rows(),
                weights=request.weights,
                frames=request.frame_rows(),
                num_tokens=request.token_counts(),
            )
            return RewardColumns.of(batch)

    def score_groups(
        self, groups: Sequence[TrajectoryGroup], *, stage_weights: Mapping[int, Mapping[str, float]],
        frames: Sequence[FrameSpec | None] | None = None,
    ) -> RewardBatch:
        """Rewards of every trajectory, group after group, each group weighted by the curriculum stage
        it was issued under; ``apply_rewards(groups, result)`` writes them into the trajectories.
        ``frames``: per trajectory, the frame of its final answer (None: the config's; see the module).

        Through Ray this ships whole groups (images, token ids): send ``requests_for_groups``'
        requests to ``score_request`` instead and ``merge_batches`` the results (see its docstring).
        """
        parts = requests_for_groups(groups, stage_weights=stage_weights, frames=frames)
        scored = [(rows, self.score_request(request)) for rows, request in parts]
        return merge_batches(scored, total=sum(len(g.trajectories) for g in groups))

    def stats(self, *, reset: bool = False) -> dict[str, float]:
        """Counts and means since the last reset, keyed by the STAT_* / *_STATS metric names."""
        scored = self._scored
        out: dict[str, float] = {
            STAT_SCORED: float(scored),
            STAT_SECONDS: self._seconds,
            STAT_CPU_SECONDS: self._cpu_seconds,
            STAT_STRICT_VIOLATIONS: float(self._strict_violations),
            STAT_CUSTOM_ERRORS: float(self._custom_errors),
            STAT_TOTAL: self._total_sum / scored if scored else 0.0,
        }
        for reason, name in PARSE_FAILURE_STATS.items():
            out[name] = float(self._failures.get(reason, 0))
        for component, total in self._component_sums.items():
            out[COMPONENT_STATS[component]] = total / self._component_counts[component]
        if reset:
            self._reset()
        return out

    def _reset(self) -> None:
        self._scored = 0
        self._seconds = 0.0
        self._cpu_seconds = 0.0
        self._strict_violations = 0
        self._custom_errors = 0
        self._total_sum = 0.0
        self._failures: Counter[str | None] = Counter()
        self._component_sums: dict[str, float] = {}
        self._component_counts: dict[str, int] = {}

    def _record(self, batch: RewardBatch, seconds: float, cpu_seconds: float) -> None:
        self._scored += len(batch)
        self._seconds += seconds
        self._cpu_seconds += cpu_seconds
        self._total_sum += sum(batch.totals)
        self._failures.update(batch.failures)  # counts None too; stats() reads only the reasons
        self._strict_violations += len(batch) - batch.strict_violations.count(None)
        for name, values in batch.components.items():
            self._component_sums[name] = self._component_sums.get(name, 0.0) + sum(values)
            self._component_counts[name] = self._component_counts.get(name, 0) + len(values)

    def _custom_value(self, completion: str, target: Target, parsed: ParsedCompletion) -> float:
        """The user reward, or 0.0 (counted, logged once) when it raises or is not a finite number."""
        try:
            value = float(self._custom(completion, target=target, parsed=parsed))  # type: ignore[misc]
            if math.isfinite(value):
                return value
            problem = f"returned {value}"
        except Exception as err:  # noqa: BLE001 - user code must not take the reward worker down
            problem = f"raised {err!r}"
        if self._custom_errors == 0:
            name = self._config.custom_reward
            logger.warning("custom reward %s %s; scoring 0 (counted in %s)", name, problem, STAT_CUSTOM_ERRORS)
        self._custom_errors += 1
        return 0.0


def apply_rewards(groups: Sequence[TrajectoryGroup], batch: RewardBatch) -> None:
    """Write ``score_groups`` results into the trajectories (rewards, reward, parse_failure)."""
    rows = iter(range(len(batch)))
    n_trajectories = sum(len(g.trajectories) for g in groups)
    if n_trajectories != len(batch):
        raise ValueError(f"{len(batch)} rewards for {n_trajectories} trajectories")
    for group in groups:
        for traj in group.trajectories:
            result = batch[next(rows)]
            traj.rewards = result.components
            traj.reward = result.total
            traj.parse_failure = result.failure


def requests_for_groups(
    groups: Sequence[TrajectoryGroup],
    *,
    stage_weights: Mapping[int, Mapping[str, float]],
    frames: Sequence[FrameSpec | None] | None = None,
) -> list[tuple[list[int], ScoreRequest]]:
    """What to send to reward actors for these groups: per curriculum stage present, the rows it
    covers (indices into the trajectories taken group after group) and a ``ScoreRequest``.

    frames: per trajectory (same order), the frame of its final answer, None for the config frame.
    Only texts, targets, token counts and frames travel: measured here for 2048 groups x 4
    trajectories with 20 kB images and 300-token completions, Ray serialises the groups themselves
    in 240 ms (81 MB); their requests hold 3.5 MB (see ``ScoreRequest`` for what they cost). Token
    counts are the model-generated tokens (loss_mask == 1), used when RewardConfig.overlong is set.
    Driver use::

        parts = requests_for_groups(groups, stage_weights=w, frames=frames)
        batches = ray.get([actor.score_request.remote(request) for _, request in parts])
        apply_rewards(groups, merge_batches([(rows, b) for (rows, _), b in zip(parts, batches)], total=n))
    """
    missing = sorted({g.stage for g in groups} - set(stage_weights))
    if missing:
        raise ValueError(f"no reward weights for curriculum stage(s) {missing}")
    n = sum(len(g.trajectories) for g in groups)
    if frames is not None and len(frames) != n:
        raise ValueError(f"frames has {len(frames)} rows for {n} trajectories")
    # Per stage: rows, completion texts, targets (one object per group, shared by its samples), token counts.
    by_stage: dict[int, tuple[list[int], list[str], list[Target], list[int]]] = {}
    row = 0
    for group in groups:
        rows, texts, targets, tokens = by_stage.setdefault(group.stage, ([], [], [], []))
        for traj in group.trajectories:
            rows.append(row)
            texts.append(traj.completion_text)
            targets.append(group.prompt.target)
            tokens.append(sum(traj.loss_mask))
            row += 1
    return [
        (rows, ScoreRequest.from_rows(
            texts, targets, weights=stage_weights[stage], num_tokens=tokens,
            frames=[frames[i] for i in rows] if frames is not None else None,
        ))
        for stage, (rows, texts, targets, tokens) in sorted(by_stage.items())
    ]


def merge_batches(parts: Sequence[tuple[Sequence[int], RewardColumns]], *, total: int) -> RewardBatch:
    """One batch in row order from ``score_request`` results and the rows each covered.

    Components missing from a part (none in practice: every request computes the same set) are 0.0
    on its rows. Raises ValueError unless the parts cover each of the ``total`` rows exactly once.
    """
    if len(parts) == 1 and list(parts[0][0]) == list(range(total)):
        return parts[0][1].to_batch()
    listed = sorted(row for rows, _ in parts for row in rows)
    if listed != list(range(total)):  # each row exactly once: overlapping parts would leave others at 0
        raise ValueError(f"the parts cover rows {listed[:8]}{'...' if len(listed) > 8 else ''}, not each of "
                         f"0..{total - 1} once")
    names = sorted({name for _, columns in parts for name in columns.components})
    merged = RewardColumns(
        totals=np.zeros(total),
        components={name: np.zeros(total) for name in names},
        failures=np.zeros(total, dtype=np.int8),
        strict_violations=np.zeros(total, dtype=np.int8),
    )
    for rows, columns in parts:
        if len(rows) != len(columns):
            raise ValueError(f"a part has {len(columns)} results for {len(rows)} rows")
        index = np.asarray(rows, dtype=np.int64)
        merged.totals[index] = columns.totals
        merged.failures[index] = columns.failures
        merged.strict_violations[index] = columns.strict_violations
        for name, values in columns.components.items():
            merged.components[name][index] = values
    return merged.to_batch()
