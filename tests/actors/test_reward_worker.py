"""actors.reward.RewardWorker: plain use, failure counts, custom rewards, groups, columnar requests and
results, and under real Ray."""

from __future__ import annotations

import pickle
import textwrap

import pyarrow as pa
import pytest

from actors.reward import (
    COMPONENT_STATS,
    PARSE_FAILURE_STATS,
    REASON_CODES,
    STAT_CPU_SECONDS,
    STAT_CUSTOM_ERRORS,
    STAT_SCORED,
    STAT_SECONDS,
    STAT_STRICT_VIOLATIONS,
    STAT_TOTAL,
    RewardColumns,
    RewardWorker,
    ScoreRequest,
    apply_rewards,
    merge_batches,
    requests_for_groups,
)
from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup
from rewards.compose import score_batch
from rewards.config import RewardConfig
from rewards.frames import FrameSpec

GOOD = '<think>bark</think><answer>{"present": true, "category": "moth", "boxes": [[10, 10, 50, 50]]}</answer>'
NONE = '<think>plain sand</think><answer>{"present": false, "category": null, "boxes": []}</answer>'
DETECT = (
    '<think>two crabs</think><answer>{"present": true, "category": "crab", "boxes": [[0, 0, 10, 10], '
    '[20, 20, 30, 30], [60, 60, 70, 70]], "confidences": [0.9, 0.8, 0.3]}</answer>'
)
MOTH = Target(present=True, category="moth", boxes=[[10, 10, 50, 60]], width=100, height=100)
EMPTY = Target(present=False, category=None, boxes=[], width=100, height=100)
CRABS = Target(present=True, category="crab", boxes=[[0, 0, 10, 10], [20, 20, 30, 30]], width=100, height=100)
CONFIG = RewardConfig(frame={"kind": "original"})
WEIGHTS = CONFIG.default_weights


def _batch(n_repeats: int = 1) -> tuple[list[str], list[Target]]:
    completions = ["", "<think>no answer yet", GOOD, "Sure. " + GOOD, NONE, DETECT] * n_repeats
    targets = [MOTH, MOTH, MOTH, MOTH, EMPTY, CRABS] * n_repeats
    return completions, targets


def test_worker_matches_plain_functions_and_counts_failures():
    worker = RewardWorker(CONFIG)
    completions, targets = _batch()
    got = worker.score(completions, targets, weights=WEIGHTS)
    assert got == score_batch(completions, targets, config=CONFIG, weights=WEIGHTS)
    # IoU [10,10,50,50] vs [10,10,50,60] = 1600 / 2000; detection: 2 of 3 exact, / max(2, 3).
    assert got[2].components["iou"] == pytest.approx(0.8)
    assert got[5].components["iou"] == pytest.approx(2 / 3)
    assert got[5].components["confidence"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)

    stats = worker.stats(reset=True)
    assert stats[STAT_SCORED] == 6
    assert stats[PARSE_FAILURE_STATS["empty"]] == 1
    assert stats[PARSE_FAILURE_STATS["no_answer_tag"]] == 1
    assert stats[PARSE_FAILURE_STATS["bad_json"]] == 0
    assert stats[STAT_STRICT_VIOLATIONS] == 3  # empty, unanswered, text before the tags
    assert stats[COMPONENT_STATS["presence"]] == pytest.approx(4 / 6)
    assert stats[STAT_TOTAL] == pytest.approx(sum(r.total for r in got) / 6)
    assert worker.stats()[STAT_SCORED] == 0  # reset


CUSTOM_MODULE = '''
import math

def think_words(completion, *, target, parsed):
    return float(len(parsed.think.split()))

def broken(completion, *, target, parsed):
    if parsed.answer is None:
        raise RuntimeError("no answer")
    return math.nan if parsed.answer.present else 2.0
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "refocus_test_custom_reward.py").write_text(textwrap.dedent(CUSTOM_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "refocus_test_custom_reward"


def test_custom_reward_is_imported_and_weighted(custom_module):
    config = RewardConfig(frame={"kind": "original"}, custom_reward=f"{custom_module}:think_words")
    worker = RewardWorker(config)
    got = worker.score([GOOD, NONE], [MOTH, EMPTY], weights={"custom": 0.5})
    assert [r.components["custom"] for r in got] == [1.0, 2.0]
    assert [r.total for r in got] == [0.5, 1.0]


def test_custom_reward_errors_score_zero_and_are_counted(custom_module):
    config = RewardConfig(frame={"kind": "original"}, custom_reward=f"{custom_module}:broken")
    worker = RewardWorker(config)
    got = worker.score(["", GOOD, NONE], [MOTH, MOTH, EMPTY], weights={"custom": 1.0})
    assert [r.components["custom"] for r in got] == [0.0, 0.0, 2.0]  # raised, NaN, fine
    assert worker.stats()[STAT_CUSTOM_ERRORS] == 2


def test_bad_custom_reward_path_fails_at_worker_start():
    config = RewardConfig(custom_reward="refocus_no_such_module:fn")
    with pytest.raises(ModuleNotFoundError):
        RewardWorker(config)


def _group(group_id: str, stage: int, texts: list[str], target: Target) -> TrajectoryGroup:
    prompt = PromptGroup(
        group_id=group_id, prompt_id=group_id, task="camo", difficulty="easy", question="?", image=b"", target=target,
        stage=stage,
    )
    trajectories = [
        Trajectory(
            sample_index=i, prompt_ids=[1], completion_ids=[2] * 95, behaviour_logprobs=[0.0] * 95,
            loss_mask=[1] * 90 + [0] * 5, completion_text=text,
        )
        for i, text in enumerate(texts)
    ]
    return TrajectoryGroup(prompt=prompt, trajectories=trajectories, policy_version=3)


def test_score_groups_uses_each_groups_stage_weights():
    config = RewardConfig(frame={"kind": "original"}, overlong={"l_max": 100, "l_cache": 20})
    worker = RewardWorker(config)
    groups = [_group("a", 1, [GOOD, ""], MOTH), _group("b", 2, [NONE], EMPTY)]
    stage_weights = {1: {"format": 1.0, "overlong": 1.0}, 2: {"iou": 2.0}}
    results = worker.score_groups(groups, stage_weights=stage_weights)
    apply_rewards(groups, results)
    first, second = groups[0].trajectories
    # 90 model tokens (loss_mask) -> overlong -0.5 on the ramp 80..100.
    assert first.reward == pytest.approx(1.0 - 0.5) and first.rewards["overlong"] == pytest.approx(-0.5)
    assert second.reward == pytest.approx(-0.5) and second.parse_failure == "empty"
    assert groups[1].trajectories[0].reward == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"stage\(s\) \[7\]"):
        worker.score_groups([_group("c", 7, [GOOD], MOTH)], stage_weights=stage_weights)


def test_score_groups_reads_a_zoomed_answer_in_its_crops_frame():
    """After a zoom onto [50, 50, 100, 100] of the 100x100 image the model answers in the crop's pixels (the
    environment says so): its box [0, 0, 50, 50] in the crop is the animal at [50, 50, 100, 100]."""
    from actors.env import ImageLimits, answer_frame

    animal = Target(present=True, category="moth", boxes=[[50, 50, 100, 100]], width=100, height=100)
    text = '<think>a</think><answer>{"present": true, "category": "moth", "boxes": [[0, 0, 50, 50]]}</answer>'
    group = _group("z", 0, [text], animal)
    group.trajectories[0].zoom_boxes = [[50.0, 50.0, 100.0, 100.0]]
    limits = ImageLimits(factor=28, min_pixels=28 * 28, max_pixels=112 * 112)
    frame = answer_frame(kind="original", width=100, height=100, zoom_boxes=group.trajectories[0].zoom_boxes,
                         limits=limits, zoom_pixels=112 * 112)
    worker = RewardWorker(CONFIG)
    weights = {0: {"iou": 1.0}}
    assert worker.score_groups([group], stage_weights=weights, frames=[frame]).totals == [pytest.approx(1.0)]
    assert worker.score_groups([group], stage_weights=weights).totals == [0.0]  # read in the full image: no overlap


def test_requests_for_groups_carry_only_what_scoring_needs():
    groups = [_group("a", 2, [GOOD, NONE], MOTH), _group("b", 1, [DETECT], CRABS), _group("c", 2, [""], EMPTY)]
    stage_weights = {1: {"iou": 1.0}, 2: {"format": 1.0}}
    parts = requests_for_groups(groups, stage_weights=stage_weights)
    assert [rows for rows, _ in parts] == [[2], [0, 1, 3]]  # stage 1 first; rows in trajectory order
    stage_two = parts[1][1]
    assert stage_two.completion_texts() == [GOOD, NONE, ""] and stage_two.target_rows() == [MOTH, MOTH, EMPTY]
    assert stage_two.weights == {"format": 1.0} and stage_two.token_counts() == [90, 90, 90]
    assert stage_two.frames is None  # no frames given: the config frame
    # Driver-style: score each request separately, merge back into trajectory order.
    worker = RewardWorker(CONFIG)
    merged = merge_batches([(rows, worker.score_request(request)) for rows, request in parts], total=4)
    assert merged == worker.score_groups(groups, stage_weights=stage_weights)
    assert merged.totals == [1.0, 1.0, pytest.approx(2 / 3), 0.0]
    scored = [(rows, worker.score_request(request)) for rows, request in parts]
    with pytest.raises(ValueError, match=r"cover rows \[0, 1, 3\], not each of 0..3 once"):
        merge_batches(scored[1:], total=4)
    # four rows listed, but row 2 twice and row 0 never: row 0 would have scored 0 unnoticed
    with pytest.raises(ValueError, match="not each of 0..3 once"):
        merge_batches([([2], scored[0][1]), ([2, 1, 3], scored[1][1])], total=4)
    with pytest.raises(ValueError, match="not each of 0..1 once"):  # a row past the batch, not an IndexError
        merge_batches([([0, 7], scored[0][1])], total=2)


OVERLONG_CONFIG = RewardConfig(frame={"kind": "original"}, overlong={"l_max": 100, "l_cache": 20})
RICH_WEIGHTS = {**WEIGHTS, "overlong": 1.0}
UNICODE = GOOD.replace("bark", "Rinde 🦋 树皮 e\u0301") + "\n"  # emoji, CJK, a combining accent, after the tags
SURROGATE = GOOD.replace("bark", "bad \ud800 byte")  # a lone surrogate: valid in a str, not in UTF-8


def _rich_batch():
    """Rows covering what a request carries: malformed and non-ASCII texts, absent targets, several
    boxes, explicit frames (crop, norm1000, input) next to config-frame rows, token counts."""
    moth = Target(present=True, category="moth", boxes=[[10, 10, 50, 60]], width=100, height=100)
    crabs = Target(present=True, category="crab", boxes=[[0, 0, 10, 10], [20, 20, 30, 30]], width=100, height=100)
    empty = Target(present=False, category=None, boxes=[], width=640, height=480)
    completions = ["", "<think>no answer yet", GOOD, UNICODE, GOOD, GOOD, GOOD, NONE, DETECT, DETECT[:-20], "{'x'"]
    targets = [moth, moth, moth, moth, moth, moth, moth, empty, crabs, crabs, empty]
    frames = [None, None, None, None,
              FrameSpec(kind="norm1000"),
              FrameSpec(kind="input", input_width=50, input_height=50),
              FrameSpec(kind="input", input_width=100, input_height=80, crop=(0.0, 0.0, 60.0, 50.0)),
              None, None, FrameSpec(kind="original", crop=(1.5, 2.5, 90.0, 95.0)), None]
    num_tokens = [0, 5, 85, 90, 10, 100, 120, 1, 80, 95, 7]
    return completions, targets, frames, num_tokens


def _round_trip(obj):
    """Pickle as Ray does: protocol 5, buffers out of band."""
    buffers: list = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers)


def test_columnar_request_carries_the_rows_exactly():
    completions, targets, frames, num_tokens = _rich_batch()
    request = _round_trip(
        ScoreRequest.from_rows(completions, targets, weights=RICH_WEIGHTS, frames=frames, num_tokens=num_tokens)
    )
    assert len(request) == 11 and request.completions.type == pa.large_string()
    assert request.completion_texts() == completions
    assert request.target_rows() == targets  # int boxes come back as equal floats
    assert request.frame_rows() == frames and request.token_counts() == num_tokens
    # Three distinct target objects, stored once each; rows of one object share its copy.
    assert request.target_index.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 1]
    assert request.targets.categories == ["moth", "crab"] and request.targets.category.tolist() == [0, -1, 1]
    assert request.targets.box_offsets.tolist() == [0, 1, 1, 3]
    rows = request.target_rows()
    assert rows[0] is rows[6] and rows[8] is rows[9]


def test_columnar_request_scores_exactly_as_plain_functions():
    completions, targets, frames, num_tokens = _rich_batch()
    plain_worker, columnar_worker = RewardWorker(OVERLONG_CONFIG), RewardWorker(OVERLONG_CONFIG)
    plain = plain_worker.score(completions, targets, weights=RICH_WEIGHTS, frames=frames, num_tokens=num_tokens)
    request = ScoreRequest.from_rows(completions, targets, weights=RICH_WEIGHTS, frames=frames, num_tokens=num_tokens)
    result = _round_trip(columnar_worker.score_request(_round_trip(request)))
    assert isinstance(result, RewardColumns) and result.to_batch() == plain
    timings = {STAT_SECONDS, STAT_CPU_SECONDS}
    counts = [{k: v for k, v in w.stats().items() if k not in timings} for w in (plain_worker, columnar_worker)]
    assert counts[0] == counts[1] and counts[0][PARSE_FAILURE_STATS["no_answer_tag"]] == 2
    # The frames were applied: box [10,10,50,50] in a 50x50 input frame is [20,20,100,100] in the
    # original; against [10,10,50,60]: intersection 30*40 = 1200, union 6400 + 2000 - 1200 = 7200.
    assert plain[5].components["iou"] == pytest.approx(1 / 6)
    assert plain[3].components["overlong"] == pytest.approx(-0.5)  # 90 tokens on the ramp 80..100
    assert [plain[i].failure for i in (0, 1, 10)] == ["empty", "no_answer_tag", "no_answer_tag"]
    assert REASON_CODES[result.failures[0]] == "empty" and result.failures[2] == 0


def test_columnar_request_keeps_texts_that_utf8_cannot_encode():
    completions = [GOOD, SURROGATE, ""]
    request = _round_trip(ScoreRequest.from_rows(completions, [MOTH] * 3, weights=WEIGHTS))
    assert request.completions.type == pa.large_binary()  # the fallback layout
    assert request.completion_texts() == completions
    worker = RewardWorker(CONFIG)
    assert worker.score_request(request).to_batch() == score_batch(completions, [MOTH] * 3, config=CONFIG,
                                                                   weights=WEIGHTS)


def test_columnar_request_drops_all_none_frames_and_rejects_bad_rows():
    assert ScoreRequest.from_rows([GOOD, NONE], [MOTH, EMPTY], weights=WEIGHTS, frames=[None, None]).frames is None
    empty = ScoreRequest.from_rows([], [], weights=WEIGHTS, num_tokens=[])
    assert len(empty) == 0 and RewardWorker(CONFIG).score_request(empty).to_batch() == score_batch(
        [], [], config=CONFIG, weights=WEIGHTS)
    with pytest.raises(ValueError, match="targets has 1 rows for 2 completions"):
        ScoreRequest.from_rows([GOOD, NONE], [MOTH], weights=WEIGHTS)
    with pytest.raises(ValueError, match="num_tokens must be integers"):
        ScoreRequest.from_rows([GOOD], [MOTH], weights=WEIGHTS, num_tokens=[3.5])
    bad_box = Target(present=True, category="moth", boxes=[[1, 2, 3]], width=10, height=10)
    with pytest.raises(ValueError, match="target boxes"):
        ScoreRequest.from_rows([GOOD], [bad_box], weights=WEIGHTS)


def test_merge_batches_puts_columns_back_in_row_order():
    worker = RewardWorker(CONFIG)
    completions, targets = _batch()
    whole = worker.score(completions, targets, weights=WEIGHTS)
    odd, even = [1, 3, 5], [0, 2, 4]
    parts = [
        (rows, worker.score_request(ScoreRequest.from_rows([completions[i] for i in rows],
                                                           [targets[i] for i in rows], weights=WEIGHTS)))
        for rows in (odd, even)
    ]
    assert merge_batches(parts, total=6) == whole
    assert merge_batches([(range(6), RewardColumns.of(whole))], total=6) == whole  # the one-part path
    with pytest.raises(ValueError, match="3 results for 2 rows"):
        merge_batches([(odd[:2], parts[0][1]), ([0, 2, 4, 5], parts[1][1])], total=6)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="ray is not installed: the Ray actor test needs it")
    ray.init(num_cpus=1, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_worker_under_ray_matches_plain_functions(ray_session):
    ray = ray_session
    actor = ray.remote(RewardWorker).remote(CONFIG)
    completions, targets = _batch(n_repeats=50)
    plain = score_batch(completions, targets, config=CONFIG, weights=WEIGHTS)
    assert ray.get(actor.score.remote(completions, targets, weights=WEIGHTS)) == plain
    request = ScoreRequest.from_rows(completions, targets, weights=WEIGHTS)
    assert ray.get(actor.score_request.remote(request)).to_batch() == plain
    stats = ray.get(actor.stats.remote())
    assert stats[STAT_SCORED] == 600 and stats[PARSE_FAILURE_STATS["empty"]] == 100
    ray.kill(actor)


def test_columnar_request_through_ray_matches_plain_functions(ray_session):
    """Frames, token counts and non-ASCII texts through Ray's own serialisation (Arrow, numpy buffers)."""
    ray = ray_session
    actor = ray.remote(RewardWorker).remote(OVERLONG_CONFIG)
    completions, targets, frames, num_tokens = _rich_batch()
    plain = score_batch(completions, targets, config=OVERLONG_CONFIG, weights=RICH_WEIGHTS, frames=frames,
                        num_tokens=num_tokens)
    request = ScoreRequest.from_rows(completions, targets, weights=RICH_WEIGHTS, frames=frames, num_tokens=num_tokens)
    assert ray.get(actor.score_request.remote(request)).to_batch() == plain
    ray.kill(actor)
