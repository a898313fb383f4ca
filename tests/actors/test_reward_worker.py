"""actors.reward.RewardWorker: plain use, failure counts, custom rewards, groups, and under real Ray."""

from __future__ import annotations

import textwrap

import pytest

from actors.reward import (
    COMPONENT_STATS,
    PARSE_FAILURE_STATS,
    STAT_CUSTOM_ERRORS,
    STAT_SCORED,
    STAT_STRICT_VIOLATIONS,
    STAT_TOTAL,
    RewardWorker,
    ScoreRequest,
    apply_rewards,
    merge_batches,
    requests_for_groups,
)
from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup
from rewards.compose import score_batch
from rewards.config import RewardConfig

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


def test_requests_for_groups_carry_only_what_scoring_needs():
    groups = [_group("a", 2, [GOOD, NONE], MOTH), _group("b", 1, [DETECT], CRABS), _group("c", 2, [""], EMPTY)]
    stage_weights = {1: {"iou": 1.0}, 2: {"format": 1.0}}
    parts = requests_for_groups(groups, stage_weights=stage_weights)
    assert [rows for rows, _ in parts] == [[2], [0, 1, 3]]  # stage 1 first; rows in trajectory order
    stage_two = parts[1][1]
    assert stage_two.completions == [GOOD, NONE, ""] and stage_two.targets == [MOTH, MOTH, EMPTY]
    assert stage_two.weights == {"format": 1.0} and stage_two.num_tokens == [90, 90, 90]
    # Driver-style: score each request separately, merge back into trajectory order.
    worker = RewardWorker(CONFIG)
    merged = merge_batches([(rows, worker.score_request(request)) for rows, request in parts], total=4)
    assert merged == worker.score_groups(groups, stage_weights=stage_weights)
    assert merged.totals == [1.0, 1.0, pytest.approx(2 / 3), 0.0]
    with pytest.raises(ValueError, match="cover 3 rows of 4"):
        merge_batches([(rows, worker.score_request(request)) for rows, request in parts[1:]], total=4)


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
    assert ray.get(actor.score_request.remote(ScoreRequest(completions, targets, WEIGHTS))) == plain
    stats = ray.get(actor.stats.remote())
    assert stats[STAT_SCORED] == 600 and stats[PARSE_FAILURE_STATS["empty"]] == 100
    ray.kill(actor)
