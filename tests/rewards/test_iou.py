"""rewards.iou: hand-computed IoU/GIoU, matching, confidence reward, batch vs brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.iou import IouConfig, box_iou, box_rewards, box_rewards_batch

OPT = IouConfig(mode="optimal", threshold=0.5)
GREEDY = IouConfig(mode="greedy", threshold=0.5)
W = H = 100  # image size of every table row


@pytest.mark.parametrize(
    "a, b, iou, giou",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0, 1.0),
        # inter 5x5 = 25, union 100 + 100 - 25 = 175; enclosing 15x15 = 225.
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175, 25 / 175 - (225 - 175) / 225),
        ([0, 0, 10, 10], [0, 0, 10, 20], 0.5, 0.5),
        # Disjoint: union 200, enclosing 30x30 = 900.
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0, -(900 - 200) / 900),
        # x2 < x1 and y2 < y1: read as the same rectangle.
        ([10, 10, 0, 0], [0, 0, 10, 10], 1.0, 1.0),
        ([10, 0, 0, 10], [0, 0, 10, 10], 1.0, 1.0),
        # Zero area (a line, a point) overlaps nothing and scores GIoU's floor: by the formula a point inside
        # the box would score -(C - U) / C = 0, above the honest box of GIoU -0.079 above.
        ([5, 5, 5, 10], [0, 0, 10, 10], 0.0, -1.0),
        ([5, 5, 5, 5], [0, 0, 10, 10], 0.0, -1.0),
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0, -1.0),
        # Out of the 100x100 image: clipped before scoring.
        ([-10, -10, 10, 10], [0, 0, 10, 10], 1.0, 1.0),
        ([90, 90, 120, 120], [90, 90, 100, 100], 1.0, 1.0),
        # Entirely outside: clipped to the degenerate [100, 100, 100, 100], the floor.
        ([110, 110, 120, 120], [90, 90, 100, 100], 0.0, -1.0),
    ],
)
def test_pair_scores(a, b, iou, giou):
    assert box_iou(a, b, width=W, height=H) == pytest.approx(iou)
    assert box_iou(a, b, width=W, height=H, giou=True) == pytest.approx(giou)


A, B = [0, 0, 10, 10], [20, 20, 30, 30]
# Greedy takes the wrong turn here: P1 (more confident) grabs A, which P2 fits perfectly.
# IoU(P1, A) = 80/120 = 2/3, IoU(P1, B2) = 70/130 = 7/13, IoU(P2, A) = 1, IoU(P2, B2) = 50/150 = 1/3.
B2, P1, P2 = [5, 0, 15, 10], [2, 0, 12, 10], [0, 0, 10, 10]


@pytest.mark.parametrize(
    "pred, gt, conf, config, iou, confidence",
    [
        # No object: none expected and none given is right; any mismatch is 0.
        ([], [], None, OPT, 1.0, 1.0),
        ([], [A], None, OPT, 0.0, 0.0),
        ([A], [], None, OPT, 0.0, 0.0),
        ([A, B], [], [0.2, 0.4], OPT, 0.0, (0.8 + 0.6) / 2),
        # Two objects in swapped order: one-to-one matching finds both.
        ([B, A], [A, B], None, OPT, 1.0, 0.0),
        ([B, A], [A, B], [0.9, 0.6], GREEDY, 1.0, (0.9 + 0.6) / 2),
        # Duplicate (overlapping) predictions: only one may match; diluted by max(#gt, #pred) = 2.
        ([A, A], [A], [0.9, 0.9], OPT, 0.5, (0.9 + 0.1) / 2),
        ([A, A], [A], [0.9, 0.9], GREEDY, 0.5, (0.9 + 0.1) / 2),
        # More predictions than objects.
        ([A, [50, 50, 60, 60], [70, 70, 80, 80]], [A], [1.0, 0.5, 0.0], GREEDY, 1 / 3, (1.0 + 0.5 + 1.0) / 3),
        # Fewer predictions than objects.
        ([A], [A, B], [0.8], OPT, 0.5, 0.8),
        # Optimal vs greedy (Visual-RFT) on the same answer.
        ([P1, P2], [A, B2], [0.9, 0.8], OPT, (7 / 13 + 1) / 2, (0.9 + 0.8) / 2),
        ([P1, P2], [A, B2], [0.9, 0.8], GREEDY, (2 / 3) / 2, (0.9 + 0.2) / 2),
        # Greedy without confidences goes in written order: P2 first takes A, P1 then gets B2.
        ([P2, P1], [A, B2], None, GREEDY, (1 + 7 / 13) / 2, 0.0),
        # Single pair below the threshold: greedy gives 0, optimal the continuous IoU (1/7).
        ([[0, 0, 10, 10]], [[5, 5, 15, 15]], [0.3], GREEDY, 0.0, 0.7),
        ([[0, 0, 10, 10]], [[5, 5, 15, 15]], [0.3], OPT, 1 / 7, 0.7),
        # Reordered and out-of-image predictions are fixed before matching.
        ([[10, 10, 0, 0], [130, 130, 90, 90]], [A, [90, 90, 100, 100]], None, OPT, 1.0, 0.0),
        # A degenerate prediction never matches.
        ([[5, 5, 5, 10]], [A], [0.6], OPT, 0.0, 0.4),
    ],
)
def test_box_rewards_table(pred, gt, conf, config, iou, confidence):
    got_iou, got_conf = box_rewards(pred, gt, width=W, height=H, config=config, confidences=conf)
    assert got_iou == pytest.approx(iou)
    assert got_conf == pytest.approx(confidence)


def test_giou_matching_scores_negative_for_far_boxes():
    config = IouConfig(mode="optimal", giou=True)
    got, _ = box_rewards([B], [A], width=W, height=H, config=config)
    assert got == pytest.approx(-(900 - 200) / 900)


def test_batch_applies_each_rows_frame_mapping():
    # Row 0: answer in a 0-1000 frame of a 100x100 image (scale 0.1); row 1: offset by a crop at (50, 50).
    iou, conf = box_rewards_batch(
        [[[0, 0, 100, 100]], [[0, 0, 10, 10]], None],
        [[A], [[50, 50, 60, 60]], [A]],
        confidences=[None, [1.0], None],
        affines=[(0.1, 0.1, 0.0, 0.0), (1.0, 1.0, 50.0, 50.0), (1.0, 1.0, 0.0, 0.0)],
        widths=[W, W, W],
        heights=[H, H, H],
        config=OPT,
    )
    assert iou.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert conf.tolist() == pytest.approx([0.0, 1.0, 0.0])


@pytest.mark.parametrize("config", [OPT, IouConfig(mode="greedy"), IouConfig(giou=True)], ids=["optimal", "greedy", "giou"])
def test_corrupt_ground_truth_gives_finite_rewards(config):
    # One box against one box, then two ground-truth boxes (the assignment refuses NaN scores), beside a
    # good row that must score as it would alone.
    iou, conf = box_rewards_batch(
        [[A], [A], [A]], [[[np.nan, 0, 10, 10]], [[np.nan, 0, 10, 10], A], [A]],
        confidences=[[0.5], None, None], affines=[(1.0, 1.0, 0.0, 0.0)] * 3,
        widths=[W] * 3, heights=[H] * 3, config=config,
    )
    assert np.isfinite(iou).all() and np.isfinite(conf).all()
    floor = -1.0 if config.giou else 0.0
    assert iou.tolist() == pytest.approx([floor, (1.0 + floor) / 2, 1.0])


def test_with_giou_junk_boxes_and_omitted_boxes_never_pay():
    """An unpaired box counts GIoU's floor, -1: a far box scores -7/9, adding junk lowers that, and
    answering no box at all scores -1, not the 0 that would make saying nothing the safe answer."""
    config = IouConfig(mode="optimal", giou=True)
    rewards = [box_rewards([B] * k, [A], width=W, height=H, config=config)[0] for k in (1, 2, 10)]
    assert rewards == pytest.approx([-7 / 9, (-7 / 9 - 1) / 2, (-7 / 9 - 9) / 10])
    assert box_rewards([], [A], width=W, height=H, config=config)[0] == -1.0
    assert box_rewards([A, B], [A], width=W, height=H, config=config)[0] == pytest.approx(0.0)  # (1 - 1) / 2


def test_with_giou_no_answer_scores_the_floor_never_above_an_answer_that_was_read():
    """No answer (unparsable, or taken away by the think rule) kept IoU 0 while a "none" on an animal scored -1
    and a missed box below 0: garbage, and contradicting the think, paid more than answering."""
    config = IouConfig(mode="optimal", giou=True)
    iou, conf = box_rewards_batch([None, [], [B]], [[A]] * 3, confidences=[None] * 3,
                                  affines=[(1.0, 1.0, 0.0, 0.0)] * 3, widths=[W] * 3, heights=[H] * 3, config=config)
    assert iou.tolist() == pytest.approx([-1.0, -1.0, -7 / 9]) and conf.tolist() == [0.0, 0.0, 0.0]
    plain, _ = box_rewards_batch([None], [[A]], confidences=[None], affines=[(1.0, 1.0, 0.0, 0.0)], widths=[W],
                                 heights=[H], config=IouConfig())
    assert plain.tolist() == [0.0]  # IoU's floor


def test_optimal_matching_pays_confidence_alike_whatever_order_the_boxes_are_written_in():
    """A box written twice fits the one animal equally well either way: the assignment chose the first written,
    so the same detections paid confidence 0.15 or 0.85 by their order. The confident one is matched, as greedy
    matches in confidence order: (0.9 + (1 - 0.2)) / 2 = 0.85 both ways."""
    for config in (IouConfig(mode="optimal"), IouConfig(mode="greedy")):
        low_first = box_rewards([A, A], [A], width=W, height=H, config=config, confidences=[0.2, 0.9])
        high_first = box_rewards([A, A], [A], width=W, height=H, config=config, confidences=[0.9, 0.2])
        assert low_first == pytest.approx((0.5, 0.85)) and high_first == pytest.approx((0.5, 0.85))


def _ref_pair(a, b, giou):
    """Plain-Python IoU/GIoU of two boxes already sanitised (reference for the numpy code)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - iw * ih
    iou = iw * ih / union if area_a > 0 and area_b > 0 else 0.0
    if not giou:
        return iou, iou
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return (iou - (c - union) / c if c > 0 and area_a > 0 and area_b > 0 else -1.0), iou


def _ref_sanitize(b):
    x1, x2 = sorted((b[0], b[2]))
    y1, y2 = sorted((b[1], b[3]))
    clip = lambda v, hi: min(max(v, 0.0), hi)  # noqa: E731
    return [clip(x1, W), clip(y1, H), clip(x2, W), clip(y2, H)]


def _reference(pred, gt, conf, config):
    """Brute force: (iou reward, set of confidence rewards of every optimal/greedy matching)."""
    floor = -1.0 if config.giou else 0.0  # what an unpaired box counts
    if not pred or not gt:
        if not pred:
            return (1.0, {1.0}) if not gt else (floor, {0.0})
        return floor, {sum(1 - c for c in conf) / len(pred) if conf else 0.0}
    p, g = [_ref_sanitize(b) for b in pred], [_ref_sanitize(b) for b in gt]
    pairs = [[_ref_pair(a, b, config.giou) for b in g] for a in p]
    thr, denominator = config.threshold, max(len(p), len(g))

    def confidence(matched):
        return sum(c if m else 1 - c for c, m in zip(conf, matched)) / len(p) if conf else 0.0

    if config.mode == "greedy":
        order = sorted(range(len(p)), key=lambda k: -conf[k]) if conf else range(len(p))
        free, matched, total = [True] * len(g), [False] * len(p), 0.0
        for k in order:
            best = max((j for j in range(len(g)) if free[j]), key=lambda j: pairs[k][j][1], default=None)
            if best is not None and pairs[k][best][1] > thr:
                free[best], matched[k] = False, True
                total += pairs[k][best][0]
        return (total + floor * (denominator - sum(matched))) / denominator, {confidence(matched)}
    assignments = []  # every one-to-one assignment of min(P, G) pairs
    for perm in itertools.permutations(range(max(len(p), len(g))), min(len(p), len(g))):
        assignments.append(list(zip(range(len(p)), perm)) if len(p) <= len(g) else list(zip(perm, range(len(g)))))
    totals = [sum(pairs[a][b][0] for a, b in asg) for asg in assignments]
    best = max(totals)
    confidences = set()
    for asg, total in zip(assignments, totals):
        if total >= best - 1e-9:
            matched = [False] * len(p)
            for a, b in asg:
                matched[a] = pairs[a][b][1] > thr
            confidences.add(round(confidence(matched), 9))
    return (best + floor * (denominator - min(len(p), len(g)))) / denominator, confidences


coord = st.floats(min_value=-50, max_value=150, allow_nan=False)
box = st.lists(coord, min_size=4, max_size=4)
row = st.tuples(
    st.lists(box, max_size=4),
    st.lists(box, max_size=4),
    st.booleans(),
    st.sampled_from([(1.0, 1.0, 0.0, 0.0), (0.1, 0.1, 0.0, 0.0), (0.5, 2.0, 10.0, -5.0)]),
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=12), greedy=st.booleans(), giou=st.booleans())
def test_batch_matches_brute_force_reference(rows, greedy, giou):
    """The numpy batch path (one pass over all pairs, then per-row matching) against brute force."""
    config = IouConfig(mode="greedy" if greedy else "optimal", giou=giou, threshold=0.3)
    preds = [p for p, _, _, _ in rows]
    gts = [g for _, g, _, _ in rows]
    confs = [[0.1 + 0.8 * (k % 2) for k in range(len(p))] if with_c else None for p, _, with_c, _ in rows]
    iou, conf = box_rewards_batch(
        preds,
        gts,
        confidences=confs,
        affines=[a for _, _, _, a in rows],
        widths=[W] * len(rows),
        heights=[H] * len(rows),
        config=config,
    )
    for i, (p, g, _, (sx, sy, ox, oy)) in enumerate(rows):
        mapped = [[b[0] * sx + ox, b[1] * sy + oy, b[2] * sx + ox, b[3] * sy + oy] for b in p]
        ref_iou, ref_confs = _reference(mapped, g, confs[i], config)
        assert iou[i] == pytest.approx(ref_iou, abs=1e-9)
        assert any(conf[i] == pytest.approx(c, abs=1e-7) for c in ref_confs)
        assert (-1.0 if giou else 0.0) <= iou[i] <= 1.0 + 1e-12 and 0.0 <= conf[i] <= 1.0
