"""``RewardPool`` with real reward workers on a local Ray: a batch split by curriculum stage comes back
whole, with the rewards one worker computes for it, counted once while scored; a worker killed while it
holds the batch is waited for and the batch is scored again, its restart counted once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from actors.metrics import WORKER_RESTARTS, RunMetrics
from actors.reward import RewardWorker
from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup
from deploy.config import load_run_config, shipped_configs
from deploy.reward_pool import RewardPool

ray = pytest.importorskip("ray")

TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")
GOOD = '<think>present moth</think><answer>{"present": true, "category": "moth", "boxes": [[10, 10, 50, 50]]}</answer>'
NONE = '<think>none</think><answer>{"present": false, "category": null, "boxes": []}</answer>'
MOTH = Target(present=True, category="moth", boxes=[[10, 10, 50, 60]], width=100, height=100)
STAGE_WEIGHTS = {0: {"format": 1.0}, 1: {"format": 1.0, "presence": 3.0, "iou": 1.0}}


def _group(group_id: str, stage: int, texts: list[str]) -> TrajectoryGroup:
    prompt = PromptGroup(group_id=group_id, prompt_id=group_id, task="camo", difficulty="easy", question="?",
                         image=b"", target=MOTH, stage=stage)
    trajectories = [Trajectory(sample_index=i, prompt_ids=[1], completion_ids=[2] * 40, behaviour_logprobs=[0.0] * 40,
                               loss_mask=[1] * 40, completion_text=text) for i, text in enumerate(texts)]
    return TrajectoryGroup(prompt=prompt, trajectories=trajectories, policy_version=0)


def _groups() -> list[TrajectoryGroup]:
    """Two stages in one batch: two requests, one per stage, to two workers."""
    return [_group("a#1", 0, [GOOD, "no answer"]), _group("b#2", 1, [GOOD, NONE]), _group("c#3", 1, [NONE, GOOD])]


def _pool() -> RewardPool:
    config = load_run_config(TINY_CPU, ["cluster.reward_workers=2", "cluster.max_restarts=1"])
    pool = RewardPool(config, metrics=RunMetrics())
    pool.start(config.cluster.reward_workers)
    pool.await_started()
    return pool


def _expected(config) -> list[list[float]]:
    groups = _groups()
    batch = RewardWorker(config.rewards).score_groups(groups, stage_weights=STAGE_WEIGHTS)
    totals = iter(batch.totals)
    return [[next(totals) for _ in g.trajectories] for g in groups]


def _take_all(pool: RewardPool) -> list[TrajectoryGroup]:
    scored = []
    while pool.pending():
        ready, _ = ray.wait(pool.pending(), num_returns=1, timeout=120)
        assert ready, "a scoring call did not return"
        scored += pool.take(ready[0])
    return scored


def test_a_batch_of_two_stages_comes_back_whole_and_scored(ray_cluster):
    pool = _pool()
    groups = _groups()
    pool.submit(groups, stage_weights=STAGE_WEIGHTS, frames=[None] * 6)
    assert len(pool.pending()) == 2  # one request per stage
    assert pool.scoring() == 3  # the batch's groups, once (not once per request)
    first = pool.pending()[0]
    ray.get(first)
    assert pool.take(first) == []  # the other part is still out
    assert pool.scoring() == 3
    scored = _take_all(pool)
    assert scored == groups and pool.scoring() == 0
    assert [[t.reward for t in g.trajectories] for g in scored] == _expected(pool.config)
    pool.kill()


def test_a_worker_killed_with_the_batch_is_waited_for_and_the_batch_scored_again(ray_cluster):
    pool = _pool()
    victim = pool.pids[0]
    pool.handles[0].__ray_call__.remote(lambda actor: time.sleep(60))  # its request waits behind this
    groups = _groups()
    pool.submit(groups, stage_weights=STAGE_WEIGHTS, frames=[None] * 6)  # worker 0 gets one of the two requests
    os.kill(victim, signal.SIGKILL)
    scored = _take_all(pool)
    assert scored == groups
    assert [[t.reward for t in g.trajectories] for g in scored] == _expected(pool.config)
    assert pool.pids[0] not in (None, victim)
    assert pool.metrics.registry.get_sample_value(WORKER_RESTARTS, {"role": "reward"}) == 1
    pool.kill()


def test_reward_workers_get_the_actor_environment_also_on_a_running_cluster(ray_cluster, monkeypatch):
    """Set after Ray started, so it reaches a worker only through the actor's runtime_env (as on a cluster the
    job joins, whose processes never saw the driver's environment)."""
    monkeypatch.setenv("HF_HOME", "/refocus-test/hf-home")
    pool = _pool()
    envs = ray.get([h.__ray_call__.remote(lambda actor: os.environ.get("HF_HOME")) for h in pool.handles])
    assert envs == ["/refocus-test/hf-home"] * 2
    pool.kill()
