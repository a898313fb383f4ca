"""Box rewards: IoU (or GIoU) with one-to-one matching, and Visual-RFT's confidence reward.

All boxes here are in ORIGINAL image pixels (rewards.frames converts answers first) and are
sanitised before any overlap is computed:
- a box written with x2 < x1 (or y2 < y1) is reordered, i.e. read as the same rectangle;
- boxes are clipped to the image [0, width] x [0, height];
- a box of zero area (after clipping) overlaps nothing: IoU 0 with every box, itself included, and
  GIoU -1 (as far from any box as a box can be; its GIoU by the formula would be 0 wherever it lies inside
  the other box, above every honest box of GIoU < 0: a point at the animal's centre would pay).

Pair score: IoU in [0, 1], or with ``giou`` GIoU = IoU - (C - U) / C in [-1, 1] (C: area of the
smallest enclosing box, U: union; a pair with C = 0 or with a zero-area box scores -1).

Matching (``IouConfig.mode``):
- ``optimal``: the one-to-one assignment maximising the summed pair score
  (scipy.optimize.linear_sum_assignment); continuous, no threshold in the reward (VLM-R1 style).
- ``greedy``: Visual-RFT. Predictions sorted by confidence (highest first; written order when no
  confidences), each matched to the still-free ground truth of highest IoU if that IoU > threshold.

IoU reward = (sum of matched pair scores + floor x unpaired) / max(#gt, #pred), where floor is the pair
score's lowest value (IoU 0, GIoU -1) and unpaired = max(#gt, #pred) - #matched pairs: range [0, 1]
([-1, 1] with giou). Extra predictions and missed objects both pull it toward the floor, so with IoU no
junk box and no omitted box can raise it. With GIoU a box of non-zero area given where an object is
otherwise missed scores above the floor wherever it lies (GIoU's credit for a near miss), so there a guess
pays a little; a zero-area one does not. No object expected and no box given: 1. Boxes expected but
none given, or none expected but some given: the floor.

A ground-truth box with a NaN coordinate (a corrupt row) pairs with nothing: its pair scores are the floor.

Confidence reward (Visual-RFT) = mean over predictions of (c if matched else 1 - c), range [0, 1],
where "matched" means matched with IoU > threshold (in optimal mode: assigned with IoU > threshold).
An answer with boxes but without valid confidences scores 0; no boxes and no objects scores 1; no
boxes while objects exist scores 0. Optimal matching breaks ties between equally scored assignments in
favour of the more confident predictions, so the written order of the boxes never changes the reward.

No answer at all (unparsable, or taken away by the think rule) scores the floor and confidence 0: never
above an answer that was read, however wrong.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import linear_sum_assignment

from rewards.types import Box

OPTIMAL = "optimal"
GREEDY = "greedy"


class IouConfig(BaseModel):
    """How predicted boxes are matched to ground truth and scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["optimal", "greedy"] = Field(OPTIMAL, description="one-to-one matching rule")
    threshold: float = Field(
        0.5, ge=0.0, lt=1.0, description="IoU a pair must exceed to count as matched (greedy, confidence)"
    )
    giou: bool = Field(False, description="score matched pairs by GIoU in [-1, 1] instead of IoU")


def sanitize(boxes: np.ndarray, width: np.ndarray | float, height: np.ndarray | float) -> np.ndarray:
    """(N, 4) boxes → reordered (x1 <= x2, y1 <= y2) and clipped to [0, width] x [0, height].

    ``width``/``height``: scalars or (N,) arrays (one image size per box).
    """
    x_lo = np.minimum(boxes[:, 0], boxes[:, 2])
    x_hi = np.maximum(boxes[:, 0], boxes[:, 2])
    y_lo = np.minimum(boxes[:, 1], boxes[:, 3])
    y_hi = np.maximum(boxes[:, 1], boxes[:, 3])
    out = np.empty_like(boxes, dtype=np.float64)
    out[:, 0] = np.clip(x_lo, 0.0, width)
    out[:, 1] = np.clip(y_lo, 0.0, height)
    out[:, 2] = np.clip(x_hi, 0.0, width)
    out[:, 3] = np.clip(y_hi, 0.0, height)
    return out


def _overlap(a: np.ndarray, b: np.ndarray, giou: bool) -> tuple[np.ndarray, np.ndarray]:
    """(score, iou) for broadcastable sanitised boxes a[..., 4] and b[..., 4]."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    # A zero-area box overlaps nothing: its intersection is 0 too, so only union == 0 needs a guard.
    degenerate = (area_a <= 0.0) | (area_b <= 0.0)
    iou = np.where(degenerate | (union <= 0.0), 0.0, inter / np.where(union > 0.0, union, 1.0))
    if not giou:
        return iou, iou
    cw = np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])
    ch = np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])
    enclosing = cw * ch
    safe = np.where(enclosing > 0.0, enclosing, 1.0)
    score = np.where((enclosing > 0.0) & ~degenerate, iou - (enclosing - union) / safe, -1.0)
    return score, iou


def pairwise_iou(a: np.ndarray, b: np.ndarray, *, giou: bool = False) -> np.ndarray:
    """(N, 4) x (M, 4) sanitised boxes → (N, M) pair scores (IoU, or GIoU when ``giou``)."""
    return _overlap(a[:, None, :], b[None, :, :], giou)[0]


def paired_iou(a: np.ndarray, b: np.ndarray, *, giou: bool = False) -> np.ndarray:
    """(N, 4) and (N, 4) sanitised boxes → (N,) scores of the pairs (a[i], b[i])."""
    return _overlap(a, b, giou)[0]


def box_iou(a: Sequence[float], b: Sequence[float], *, width: float, height: float, giou: bool = False) -> float:
    """Score of one pair of raw boxes (sanitised against a width x height image first)."""
    pa = sanitize(np.asarray([a], dtype=np.float64), width, height)
    pb = sanitize(np.asarray([b], dtype=np.float64), width, height)
    return float(paired_iou(pa, pb, giou=giou)[0])


def _floor(config: IouConfig) -> float:
    """The lowest pair score: what an unpaired box counts."""
    return -1.0 if config.giou else 0.0


def _match(
    score: np.ndarray, iou: np.ndarray, confidences: Sequence[float] | None, config: IouConfig
) -> tuple[float, int, list[bool]]:
    """(sum of matched pair scores, number of pairs, per prediction: matched with IoU > threshold) of one
    answer.

    ``score``/``iou``: (P, G) matrices of the answer's predictions against the ground truth.
    """
    n_pred = score.shape[0]
    if config.mode == OPTIMAL:
        # Among assignments of equal summed score (a box written twice), the one matching the more confident
        # prediction above the threshold wins, as greedy's confidence order decides: otherwise the written order
        # would decide, and the confidence reward would pay for writing the confident box first. The tie-break
        # term (at most 1e-9 per pair) only chooses; the reward sums the untouched scores.
        choose = score
        if confidences is not None:
            choose = score + 1e-9 * np.asarray(confidences, dtype=np.float64)[:, None] * (iou > config.threshold)
        rows, cols = linear_sum_assignment(choose, maximize=True)
        matched = [False] * n_pred
        for r, hit in zip(rows.tolist(), (iou[rows, cols] > config.threshold).tolist()):
            matched[r] = hit
        return float(score[rows, cols].sum()), len(rows), matched
    iou_rows, score_rows = iou.tolist(), score.tolist()
    order = range(n_pred) if confidences is None else sorted(range(n_pred), key=lambda p: -confidences[p])
    free = [True] * score.shape[1]
    matched = [False] * n_pred
    total = 0.0
    for p in order:
        best, best_iou = -1, config.threshold
        for g, value in enumerate(iou_rows[p]):
            if free[g] and value > best_iou:
                best, best_iou = g, value
        if best >= 0:
            free[best] = False
            matched[p] = True
            total += score_rows[p][best]
    return total, sum(matched), matched


def _empty_case(n_pred: int, n_gt: int, confidences: Sequence[float] | None, floor: float) -> tuple[float, float]:
    if n_pred == 0:
        return (1.0, 1.0) if n_gt == 0 else (floor, 0.0)
    # Boxes given where no object exists: every prediction is unmatched.
    return floor, (sum(1.0 - c for c in confidences) / n_pred if confidences is not None else 0.0)


def box_rewards(
    pred: Sequence[Sequence[float]],
    gt: Sequence[Sequence[float]],
    *,
    width: float,
    height: float,
    config: IouConfig,
    confidences: Sequence[float] | None = None,
) -> tuple[float, float]:
    """(iou reward, confidence reward) of one answer; boxes in original pixels, ranges in module doc."""
    iou, confidence = box_rewards_batch(
        [[list(b) for b in pred]],
        [gt],
        confidences=[confidences],
        affines=[(1.0, 1.0, 0.0, 0.0)],
        widths=[width],
        heights=[height],
        config=config,
    )
    return float(iou[0]), float(confidence[0])


def box_rewards_batch(
    preds: Sequence[Sequence[Box] | None],
    gts: Sequence[Sequence[Sequence[float]]],
    *,
    confidences: Sequence[Sequence[float] | None],
    affines: Sequence[tuple[float, float, float, float]],
    widths: Sequence[float],
    heights: Sequence[float],
    config: IouConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(iou, confidence) rewards, each (N,), of a batch of answers.

    ``preds[i]`` is in the completion frame and is mapped to original pixels by
    ``affines[i] = (sx, sy, ox, oy)`` (see rewards.frames); None means no answer (IoU reward the floor,
    confidence reward 0).
    ``confidences[i]`` is parallel to ``preds[i]`` or None. Every box of the batch is mapped,
    sanitised and scored against the boxes of its row in one numpy pass over all (pred, gt) pairs;
    only the matching of rows with several boxes runs row by row.
    """
    n = len(preds)
    floor = _floor(config)
    iou_out = np.zeros(n)
    conf_out = np.zeros(n)
    rows: list[int] = []
    n_pred: list[int] = []
    n_gt: list[int] = []
    pred_flat: list[Sequence[float]] = []
    gt_flat: list[Sequence[float]] = []
    for i in range(n):
        pred = preds[i]
        if pred is None:  # no answer: the lowest IoU reward (GIoU's -1: never above a wrong answer) and confidence 0
            iou_out[i] = floor
            continue
        gt = gts[i]
        if not pred or not gt:
            iou_out[i], conf_out[i] = _empty_case(len(pred), len(gt), confidences[i], floor)
            continue
        rows.append(i)
        n_pred.append(len(pred))
        n_gt.append(len(gt))
        pred_flat.extend(pred)
        gt_flat.extend(gt)
    if not rows:
        return iou_out, conf_out

    row_idx = np.asarray(rows)
    np_, ng = np.asarray(n_pred), np.asarray(n_gt)
    aff = np.asarray(affines, dtype=np.float64)[row_idx]
    w = np.asarray(widths, dtype=np.float64)[row_idx]
    h = np.asarray(heights, dtype=np.float64)[row_idx]
    pred_owner = np.repeat(np.arange(len(rows)), np_)  # position in `rows` of each predicted box
    gt_owner = np.repeat(np.arange(len(rows)), ng)
    pred_arr = np.asarray(pred_flat, dtype=np.float64)
    pred_arr = pred_arr * aff[pred_owner][:, [0, 1, 0, 1]] + aff[pred_owner][:, [2, 3, 2, 3]]
    pred_arr = sanitize(pred_arr, w[pred_owner], h[pred_owner])
    gt_arr = sanitize(np.asarray(gt_flat, dtype=np.float64), w[gt_owner], h[gt_owner])

    # All (pred, gt) pairs of each row, row-major: pair k of row r is (k // ng[r], k % ng[r]).
    pairs = np_ * ng
    pair_start = np.cumsum(pairs) - pairs
    pair_owner = np.repeat(np.arange(len(rows)), pairs)
    local = np.arange(int(pairs.sum())) - pair_start[pair_owner]
    pred_start = np.cumsum(np_) - np_
    gt_start = np.cumsum(ng) - ng
    pair_pred = pred_start[pair_owner] + local // ng[pair_owner]
    pair_gt = gt_start[pair_owner] + local % ng[pair_owner]
    score, iou = _overlap(pred_arr[pair_pred], gt_arr[pair_gt], config.giou)
    # A corrupt (NaN) ground-truth box pairs with nothing; the assignment below refuses NaN scores.
    score, iou = np.where(np.isnan(score), floor, score), np.nan_to_num(iou, nan=0.0)

    # One box against one box: the common case, finished without a per-row loop.
    single = pairs == 1
    if single.any():
        at = pair_start[single]
        s_score, s_matched = score[at], iou[at] > config.threshold
        out_rows = row_idx[single]
        iou_out[out_rows] = s_score if config.mode == OPTIMAL else np.where(s_matched, s_score, floor)
        conf = np.array([_first_or_nan(confidences[i]) for i in out_rows.tolist()])
        conf_out[out_rows] = np.where(np.isnan(conf), 0.0, np.where(s_matched, conf, 1.0 - conf))
    for r in np.flatnonzero(~single).tolist():
        i, p, g, a = rows[r], n_pred[r], n_gt[r], int(pair_start[r])
        total, pairs_matched, matched = _match(
            score[a : a + p * g].reshape(p, g), iou[a : a + p * g].reshape(p, g), confidences[i], config
        )
        iou_out[i] = (total + floor * (max(p, g) - pairs_matched)) / max(p, g)
        c = confidences[i]
        if c is not None:
            conf_out[i] = sum(c[k] if matched[k] else 1.0 - c[k] for k in range(p)) / p
    return iou_out, conf_out


def _first_or_nan(confidences: Sequence[float] | None) -> float:
    return confidences[0] if confidences is not None else np.nan
