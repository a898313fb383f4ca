"""Evaluation harness: run a checkpoint over test splits and measure what it sees.

``evaluate`` runs the rollout worker (the engine of ``config.rollout.engine``, the run's prompts and
zoom environment) over every row of each split, in two modes: ``greedy`` (temperature 0, one sample)
and ``sampled`` (the run's temperature, top_p and n; every figure is the mean over the n samples).
Each final answer is parsed as the rewards parse it (``config.rewards`` parse mode, limits and think rule)
and its boxes are mapped to original pixels in one place, ``actors.env.answer_frame`` (the last zoom
crop's frame, else the image's) and ``actors.env.boxes_to_original`` (``rewards.frames``), then clipped
to the image.

Metrics, per split, overall and per task (keys are the ``M_*`` constants):
- format validity: share of samples following the strict grammar with clean JSON (``ParsedCompletion.strict``);
- answer rate: share of samples an answer could be extracted from (the parse mode of the run);
- presence accuracy: over all rows; an answer without a presence (or no answer) is wrong;
- presence AUC: how well the model ranks rows with an animal above rows without, whatever its threshold:
  the ROC AUC of each row's share of samples answering "present" against the truth (greedy, one sample
  per row: the balanced accuracy). When presence accuracy is low but the AUC is high, the model can tell
  and only answers "present" too often or too rarely (a calibration matter RL's rewards can move); when
  the AUC is low, it cannot see the animal;
- category accuracy: over present rows that HAVE a category (normalised match with the run's synonyms);
- mIoU: over present rows. Each ground-truth box is paired with at most one predicted box by the
  one-to-one assignment maximising total IoU; a row's IoU is the mean over its ground-truth boxes of
  its pair's IoU (0 if unpaired). With one ground-truth box that is the best IoU of any predicted
  box; no predicted box (or no answer) scores 0. Extra predicted boxes are NOT penalised here:
  AP@0.5 counts them as false positives, and ``pred_boxes`` shows box spraying;
- AP@0.5: every predicted box of every row (absent rows included) is a detection, scored by its
  answer's confidence when the answer gives valid confidences, else by its order (the k-th box of an
  answer scores 1/(k+1), so first boxes rank first). Within a row, detections in score order are
  matched greedily to the free ground-truth box of highest IoU, a true positive when IoU >= 0.5.
  AP is the all-point interpolated area under precision/recall (VOC 2010+), with detections of EQUAL
  score entering together (one point), so the result does not depend on row order;
- completion tokens (model tokens, environment tokens excluded), zoom turns, predicted boxes per answer;
- distinct answers: how many different normalised answers (presence, normalised category, boxes
  rounded to whole original pixels) the extracted answers hold. A model that ignores the image gives
  one answer whatever it is shown: compare this with ``rows``.
Baselines, data-only: the best fixed box (``best_fixed_box``: one box, in image-relative coordinates,
maximising mean IoU over the split's present rows, fitted ON those rows, so it bounds what any
image-independent box can reach) and the majority-class presence accuracy.

Corrupt rows are counted by field and skipped when the split is read (``deploy.training_data``);
prompts the rollout worker rejects are counted as ``bad_prompts``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import mannwhitneyu

from actors.config import RolloutConfig
from actors.env import answer_frame, boxes_to_original
from actors.types import Target, Trajectory
from deploy.config import RunConfig
from deploy.training_data import TrainingData, load_training_data
from rewards.category import category_reward, normalize_category
from rewards.compose import parse_all
from rewards.iou import pairwise_iou, sanitize
from rewards.presence import presence_reward

log = logging.getLogger(__name__)

GREEDY = "greedy"
SAMPLED = "sampled"
MODES = (GREEDY, SAMPLED)

# Keys of one metrics table (eval.json: splits.<split>.modes.<mode>.all / .by_task.<task>).
M_ROWS = "rows"
M_SAMPLES = "samples"
M_FORMAT = "format_valid"
M_ANSWERED = "answer_rate"
M_PRESENCE = "presence_acc"
M_PRESENCE_AUC = "presence_auc"
M_CATEGORY = "category_acc"
M_MIOU = "miou"
# Within one run mIoU = found rate × mIoU of the found rows (a row with an animal and no box scores IoU 0), which
# tells a model that boxes worse from one that says "none" to more animals. Averaged over sampled runs the
# product holds only approximately.
M_FOUND = "found_rate"  # share of the rows with an animal whose answer gives at least one box
M_MIOU_FOUND = "miou_found"  # mIoU over those rows only
M_AP50 = "ap50"
M_TOKENS = "completion_tokens"
M_ZOOMS = "zoom_turns"
M_PRED_BOXES = "pred_boxes"
M_DISTINCT = "distinct_answers"
# Computed per run over the rows (one sample each), then averaged over the runs.
RUN_METRICS = (M_FORMAT, M_ANSWERED, M_PRESENCE, M_CATEGORY, M_MIOU, M_FOUND, M_MIOU_FOUND, M_AP50, M_TOKENS,
               M_ZOOMS, M_PRED_BOXES, M_DISTINCT)
METRICS = (M_ROWS, M_SAMPLES, *RUN_METRICS, M_PRESENCE_AUC)
# Keys of a baseline table (splits.<split>.baseline.all / .by_task.<task>).
B_FIXED_BOX = "fixed_box"  # [x1, y1, x2, y2] as fractions of the image width / height
B_FIXED_BOX_MIOU = "fixed_box_miou"
B_MAJORITY_PRESENCE = "majority_presence_acc"

AP_IOU_THRESHOLD = 0.5
ALL_TASKS = "all"
EXAMPLE_TEXT_CHARS = 400  # completion text kept per example (the report shows it)

ProgressFn = Callable[[int, int], None]
Box = list[float]


# --------------------------------------------------------------------------- metric functions (pure)


def row_iou(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]], *, width: float,
            height: float) -> float:
    """IoU in [0, 1] of one answer's boxes with one row's ground truth (same frame, e.g. original px).

    Boxes are first reordered and clipped into the width x height image. Each ground-truth box is paired
    with at most one predicted box (one-to-one assignment maximising the total IoU); the result is the
    mean over ground-truth boxes of the paired IoU, 0 for an unpaired one. No predicted box: 0.
    """
    if not gt:
        raise ValueError("row_iou: the row has no ground-truth box (mIoU is over present rows)")
    if not pred:
        return 0.0
    p = sanitize(np.asarray(pred, dtype=np.float64), width, height)
    g = sanitize(np.asarray(gt, dtype=np.float64), width, height)
    iou = pairwise_iou(g, p)  # (G, P)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / len(gt))


def detection_scores(n_boxes: int, confidences: Sequence[float] | None) -> list[float]:
    """Ranking score of each predicted box: its confidence when given, else 1/(k+1) for the k-th box."""
    if confidences is not None and len(confidences) == n_boxes:
        return [float(c) for c in confidences]
    return [1.0 / (k + 1) for k in range(n_boxes)]


def match_detections(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]], *, scores: Sequence[float],
                     width: float, height: float, threshold: float = AP_IOU_THRESHOLD) -> list[bool]:
    """True positive flag per predicted box of one row (parallel to ``pred``).

    Boxes are taken in descending score (ties: answer order); each takes the free ground-truth box of
    highest IoU, and is a true positive when that IoU is >= ``threshold``.
    """
    hits = [False] * len(pred)
    if not pred or not gt:
        return hits
    iou = pairwise_iou(sanitize(np.asarray(pred, dtype=np.float64), width, height),
                       sanitize(np.asarray(gt, dtype=np.float64), width, height))
    free = np.ones(len(gt), dtype=bool)
    for k in sorted(range(len(pred)), key=lambda i: -scores[i]):
        candidates = np.where(free, iou[k], -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] >= threshold:
            free[best] = False
            hits[k] = True
    return hits


def average_precision(detections: Sequence[tuple[float, bool]], *, n_positives: int) -> float | None:
    """All-point interpolated AP in [0, 1] of ``(score, is_true_positive)`` detections.

    Detections of equal score enter the precision/recall curve together (one point), so the result
    does not depend on their order. None when there are no positives (AP is undefined).
    """
    if n_positives <= 0:
        return None
    if not detections:
        return 0.0
    ordered = sorted(detections, key=lambda d: -d[0])
    recalls, precisions = [0.0], [1.0]
    tp = fp = 0
    for i, (score, hit) in enumerate(ordered):
        tp += hit
        fp += not hit
        if i + 1 == len(ordered) or ordered[i + 1][0] != score:  # last detection of this score level
            recalls.append(tp / n_positives)
            precisions.append(tp / (tp + fp))
    # Interpolated precision at recall r: the best precision at any recall >= r.
    for i in range(len(precisions) - 2, -1, -1):
        precisions[i] = max(precisions[i], precisions[i + 1])
    return float(sum((recalls[i] - recalls[i - 1]) * precisions[i] for i in range(1, len(recalls))))


def _fixed_box_scores(candidates: np.ndarray, gt: np.ndarray, owner: np.ndarray, weight: np.ndarray,
                      n_rows: int) -> np.ndarray:
    """(C,) mean row IoU of each candidate box used as the only prediction of every row.

    With one predicted box, ``row_iou`` is the best IoU over the row's G ground-truth boxes divided by G.
    """
    iou = pairwise_iou(sanitize(candidates, 1.0, 1.0), gt) * weight  # (C, M)
    best = np.zeros((len(candidates), n_rows))
    np.maximum.at(best.T, owner, iou.T)  # best[c, r] = max over row r's boxes
    return best.mean(axis=1)


def best_fixed_box(rows: Sequence[tuple[Sequence[Sequence[float]], int, int]], *, grid: int = 10,
                   refine_steps: int = 5) -> tuple[Box, float]:
    """The single box maximising mean ``row_iou`` over ``rows`` of ``(gt boxes, width, height)``.

    Boxes are image-relative ([0, 1] of each image's width and height; IoU does not change under the
    scaling, so images of different sizes share one answer). Search: every box with corners on a
    ``grid`` x ``grid`` lattice, then coordinate ascent from the best one with steps 1/(2 grid),
    halved ``refine_steps`` times. Returns (box, its mean row IoU); ([], 0.0) without rows.
    A local search: its box is never worse than the best lattice box, but need not be the global best.
    """
    rows = [r for r in rows if r[0]]
    if not rows:
        return [], 0.0
    gt, owner, weight = [], [], []
    for r, (boxes, width, height) in enumerate(rows):
        for b in boxes:
            gt.append([b[0] / width, b[1] / height, b[2] / width, b[3] / height])
            owner.append(r)
            weight.append(1.0 / len(boxes))
    gt_arr = sanitize(np.asarray(gt, dtype=np.float64), 1.0, 1.0)
    owner_arr, weight_arr = np.asarray(owner), np.asarray(weight)

    def score(candidates: np.ndarray) -> np.ndarray:
        return _fixed_box_scores(candidates, gt_arr, owner_arr, weight_arr, len(rows))

    ticks = np.linspace(0.0, 1.0, grid + 1)
    lo, hi = np.triu_indices(grid + 1, k=1)  # every (a, b) with a < b
    xs = np.stack([ticks[lo], ticks[hi]], axis=1)
    pairs = np.repeat(xs, len(xs), axis=0), np.tile(xs, (len(xs), 1))
    lattice = np.stack([pairs[0][:, 0], pairs[1][:, 0], pairs[0][:, 1], pairs[1][:, 1]], axis=1)
    scores = score(lattice)
    box, best = lattice[int(np.argmax(scores))], float(scores.max())
    step = 1.0 / (2 * grid)
    for _ in range(refine_steps):
        while True:  # IoU is bounded, every accepted move gains: this ends
            moves = np.repeat(box[None, :], 8, axis=0)
            for k in range(4):
                moves[2 * k, k] += step
                moves[2 * k + 1, k] -= step
            moves = np.clip(moves, 0.0, 1.0)
            valid = (moves[:, 2] > moves[:, 0]) & (moves[:, 3] > moves[:, 1])
            moved = score(moves[valid])
            if not len(moved) or moved.max() <= best + 1e-12:
                break
            box, best = moves[valid][int(np.argmax(moved))], float(moved.max())
        step /= 2
    return [float(v) for v in box], best


def answer_key(present: bool | None, category: str | None, boxes: Sequence[Sequence[float]]) -> str:
    """Normalised answer string: presence, normalised category, sorted boxes rounded to whole pixels."""
    rounded = sorted([round(v) for v in box] for box in boxes)
    name = normalize_category(category) if category else None
    return json.dumps([present, name or None, rounded])


# --------------------------------------------------------------------------- per-sample scoring


@dataclass
class SampleScore:
    """What one sample contributes to the metrics (boxes in original pixels)."""

    row_id: str
    task: str
    sample_index: int
    strict: bool
    answered: bool
    presence: float  # 1.0 when the presence is right
    category: float | None  # None: not counted (absent row, or a present row without category)
    iou: float | None  # None on absent rows
    detections: list[tuple[float, bool]]  # (score, true positive) per predicted box
    n_gt: int  # ground-truth boxes of the row
    tokens: int
    zooms: int
    key: str | None  # normalised answer, None without an answer
    boxes: list[Box] = field(default_factory=list)
    present: bool | None = None
    stated_category: str | None = None  # Answer.stated_category: none for a "none" that names one
    text: str = ""  # the completion, cut to EXAMPLE_TEXT_CHARS
    target_present: bool | None = None  # the row's truth
    zoom_boxes: list[Box] = field(default_factory=list)  # the regions the sample zoomed into, original pixels


def score_sample(trajectory: Trajectory, *, row_id: str, task: str, target: Target, config: RunConfig,
                 limits) -> SampleScore:
    """Score one trajectory against its row's target; ``limits`` is the worker's ``ImageLimits``."""
    rewards = config.rewards
    # Read as the reward worker reads it, think rule included: an answer that contradicts its brief think is
    # no answer to RL, and an evaluation that counted it would credit what RL is taught not to do.
    [parsed] = parse_all([trajectory.completion_text], config=rewards)
    answer = parsed.answer
    boxes: list[Box] = []
    if answer is not None and answer.detections:
        frame = answer_frame(kind=config.rollout.prompt.frame, width=target.width, height=target.height,
                             zoom_boxes=trajectory.zoom_boxes, limits=limits,
                             zoom_pixels=config.rollout.env.zoom_pixels)
        boxes = boxes_to_original(answer.detections, frame=frame, width=target.width, height=target.height)
        # Clipped to the image as every metric reads them (a finite 1e308 in a frame scaled up becomes inf,
        # which the answer key could not round), and as the report draws them.
        boxes = sanitize(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), target.width, target.height).tolist()
    size = {"width": target.width, "height": target.height}
    category = None
    if target.present and target.category is not None:
        category = category_reward(answer.stated_category if answer else None, target_category=target.category,
                                   synonyms=rewards.synonym_index)
    scores = detection_scores(len(boxes), answer.confidences if answer else None)
    hits = match_detections(boxes, target.boxes, scores=scores, **size)
    return SampleScore(
        row_id=row_id, task=task, sample_index=trajectory.sample_index, strict=parsed.strict,
        answered=answer is not None,
        presence=presence_reward(answer.present if answer else None, target_present=target.present),
        category=category,
        iou=row_iou(boxes, target.boxes, **size) if target.present and target.boxes else None,
        detections=list(zip(scores, hits)), n_gt=len(target.boxes),
        tokens=sum(trajectory.loss_mask), zooms=len(trajectory.zoom_boxes),
        key=answer_key(answer.present, answer.stated_category, boxes) if answer else None,
        boxes=boxes, present=answer.present if answer else None,
        stated_category=answer.stated_category if answer else None,
        text=trajectory.completion_text[:EXAMPLE_TEXT_CHARS],
        target_present=target.present, zoom_boxes=[list(b) for b in trajectory.zoom_boxes])


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _run_metrics(samples: Sequence[SampleScore]) -> dict:
    """Metrics of ONE sample per row (one 'run' over the split)."""
    category = [s.category for s in samples if s.category is not None]
    ious = [s.iou for s in samples if s.iou is not None]
    found = [s.iou for s in samples if s.iou is not None and s.boxes]
    answered = [s for s in samples if s.answered]
    return {
        M_FORMAT: _mean([float(s.strict) for s in samples]),
        M_ANSWERED: _mean([float(s.answered) for s in samples]),
        M_PRESENCE: _mean([s.presence for s in samples]),
        M_CATEGORY: _mean(category),
        M_MIOU: _mean(ious),
        M_FOUND: len(found) / len(ious) if ious else None,
        M_MIOU_FOUND: _mean(found),
        M_AP50: average_precision([d for s in samples for d in s.detections], n_positives=sum(s.n_gt for s in samples)),
        M_TOKENS: _mean([float(s.tokens) for s in samples]),
        M_ZOOMS: _mean([float(s.zooms) for s in samples]),
        M_PRED_BOXES: _mean([float(len(s.boxes)) for s in answered]),
        M_DISTINCT: float(len({s.key for s in answered})),
    }


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """ROC AUC of scores for the positive class: the share of (positive, negative) pairs the positive one
    scores higher, ties counting half; None unless both groups have members. That share is exactly the
    Mann-Whitney U of the two groups (midranks for ties) over the number of pairs."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    return float(mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))


def presence_auc(samples: Sequence[SampleScore]) -> float | None:
    """ROC AUC (ties count half) of each row's share of samples answering "present" (no answer: not
    present) for the rows' truth; None unless there are rows with and rows without an animal."""
    said: dict[str, list[float]] = {}
    truth: dict[str, bool] = {}
    for s in samples:
        said.setdefault(s.row_id, []).append(float(s.present is True))
        truth[s.row_id] = bool(s.target_present)
    return roc_auc([float(np.mean(v)) for row, v in said.items() if truth[row]],
                   [float(np.mean(v)) for row, v in said.items() if not truth[row]])


def aggregate(samples: Sequence[SampleScore]) -> dict:
    """Metrics table of a set of samples: each RUN_METRICS entry is computed per sample index (one run
    over the rows) and averaged over the runs; a metric undefined in a run (e.g. no present rows) is None.
    The presence AUC ranks rows by all their samples at once."""
    runs: dict[int, list[SampleScore]] = {}
    for s in samples:
        runs.setdefault(s.sample_index, []).append(s)
    tables = [_run_metrics(run) for _, run in sorted(runs.items())]
    out: dict = {M_ROWS: len({s.row_id for s in samples}), M_SAMPLES: len(samples)}
    for name in RUN_METRICS:
        values = [t[name] for t in tables]
        out[name] = None if not values or any(v is None for v in values) else float(np.mean(values))
    out[M_PRESENCE_AUC] = presence_auc(samples)
    return out


def baseline(rows: Sequence[dict]) -> dict:
    """Data-only baselines of a set of rows (see the module docstring)."""
    box, miou = best_fixed_box([(r["boxes"], r["width"], r["height"]) for r in rows if r["present"]])
    present = sum(bool(r["present"]) for r in rows)
    majority = max(present, len(rows) - present) / len(rows) if rows else None
    return {B_FIXED_BOX: [round(v, 4) for v in box] or None, B_FIXED_BOX_MIOU: miou if box else None,
            B_MAJORITY_PRESENCE: majority}


def _by_task(items: Sequence, task_of: Callable, table: Callable) -> dict:
    tasks = sorted({task_of(item) for item in items})
    return {ALL_TASKS: table(items), "by_task": {t: table([i for i in items if task_of(i) == t]) for t in tasks}}


# --------------------------------------------------------------------------- the harness


def mode_config(rollout: RolloutConfig, mode: str) -> RolloutConfig:
    """The run's rollout config for ``mode``: greedy = temperature 0, n 1, top_p 1; sampled = as is."""
    if mode == SAMPLED:
        return rollout
    if mode != GREEDY:
        raise ValueError(f"modes: unknown {mode!r} (expected {MODES})")
    data = rollout.model_dump()
    data["sampling"].update(temperature=0.0, n=1, top_p=1.0)
    return RolloutConfig.model_validate(data)  # validated again: no unchecked copy


def evaluation_settings(config: RunConfig, modes: Sequence[str]) -> dict:
    """What decides an evaluation's figures besides the model and the rows (JSON values): how the model is prompted,
    served and sampled in each mode, and how its answers are read. Recorded in eval.json, so a cached evaluation
    (``bench.checkpoint_curve``) is reused only under the settings that made it."""
    rollout = config.rollout
    return {"prompt": rollout.prompt.model_dump(mode="json"), "env": rollout.env.model_dump(mode="json"),
            "engine": rollout.engine.model_dump(mode="json", include={"backend", "dtype", "max_model_len"}),
            "modes": {m: mode_config(rollout, m).sampling.model_dump(mode="json") for m in modes},
            "rewards": config.rewards.model_dump(mode="json")}


def load_split(path: Path, *, limit: int | None) -> TrainingData:
    """A split's valid rows (first ``limit``), corrupt ones counted by field. Fails only if none is usable."""
    data = load_training_data(path, max_bad_fraction=1.0)
    if limit is not None:
        data.rows = dict(list(data.rows.items())[:limit])
    return data


def evaluate(*, model_path: str | Path, data_dir: str | Path, splits: Sequence[str] = ("test_easy", "test_hard"),
             config: RunConfig, modes: Sequence[str] = MODES, limit: int | None = None,
             progress: ProgressFn | None = None, examples: int = 16, batch_prompts: int = 16) -> dict:
    """Evaluate the checkpoint at ``model_path`` on ``<data_dir>/<split>.parquet`` for each split.

    Returns a JSON-able dict: ``splits.<split>`` holds ``rows``, ``bad_rows`` (by field), ``baseline``
    ({all, by_task}), ``modes.<mode>`` ({all, by_task} metric tables and ``bad_prompts``) and
    ``examples`` (the first ``examples`` rows' answers in the first mode, boxes in original pixels).
    ``progress(done, total)`` counts rows over all splits and modes. ``batch_prompts`` rows go to the
    engine per call (the engine further bounds its batch, e.g. ``engine.max_batch_sequences``).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    if examples < 0 or batch_prompts < 1:
        raise ValueError("examples must be >= 0 and batch_prompts >= 1")
    if not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes: need distinct modes out of {MODES}, got {list(modes)}")
    configs = {mode: mode_config(config.rollout, mode) for mode in modes}
    data_dir = Path(data_dir)
    data = {split: load_split(data_dir / f"{split}.parquet", limit=limit) for split in splits}
    start = time.perf_counter()
    total = sum(len(d.rows) for d in data.values()) * len(modes)
    done = 0

    from actors.engines import build_engine
    from actors.rollout import RolloutWorker

    # Evaluation runs alone: the training run's core binding (rollout.engine.cpu_cores) does not apply.
    engine = build_engine(config.rollout.engine.model_copy(update={"cpu_cores": None}), model_path=str(model_path))
    result: dict = {"model_path": str(model_path), "data_dir": str(data_dir), "frame": config.rollout.prompt.frame,
                    "engine": config.rollout.engine.backend, "limit": limit,
                    "modes": {m: c.sampling.model_dump() for m, c in configs.items()},
                    "settings": evaluation_settings(config, modes), "splits": {}}
    try:
        workers = {mode: RolloutWorker(config=c, model_path=str(model_path), worker_id=f"eval-{mode}", engine=engine)
                   for mode, c in configs.items()}
        for split, split_data in data.items():
            rows = list(split_data.rows.values())
            entry: dict = {"rows": len(rows), "bad_rows": dict(split_data.bad_rows),
                           "baseline": _by_task(rows, lambda r: r["task"], baseline), "modes": {}}
            for mode, worker in workers.items():
                samples: list[SampleScore] = []
                ids = list(split_data.rows)
                bad_prompts = 0
                for at in range(0, len(ids), batch_prompts):
                    chunk = [split_data.prompt_group(i, issue=0, stage=0) for i in ids[at:at + batch_prompts]]
                    groups = worker.generate_groups(chunk)
                    bad_prompts += len(chunk) - len(groups)
                    for group in groups:
                        samples += [score_sample(t, row_id=group.prompt.prompt_id, task=group.prompt.task,
                                                 target=group.prompt.target, config=config, limits=worker.env.limits)
                                    for t in group.trajectories]
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                entry["modes"][mode] = {**_by_task(samples, lambda s: s.task, aggregate), "bad_prompts": bad_prompts}
                if "examples" not in entry:
                    entry["examples"] = _examples(samples, rows, limit=examples)
                log.info("eval %s %s: %s", split, mode, json.dumps(entry["modes"][mode][ALL_TASKS]))
            result["splits"][split] = entry
    finally:
        engine.close()
    result["seconds"] = time.perf_counter() - start
    return result


def _examples(samples: Sequence[SampleScore], rows: Sequence[dict], *, limit: int) -> list[dict]:
    """The first sample of the first ``limit`` rows: the answer as the report draws it."""
    first = {s.row_id: s for s in samples if s.sample_index == 0}
    out = []
    for row in rows[:limit]:
        s = first.get(row["id"])
        if s is None:
            continue
        out.append({"id": s.row_id, "answered": s.answered, "present": s.present, "category": s.stated_category,
                    "boxes": [[round(v, 1) for v in b] for b in s.boxes], "iou": s.iou, "strict": s.strict,
                    "text": s.text, "zoom_boxes": s.zoom_boxes})
    return out
