"""Chaos: worker processes killed by pid (SIGKILL) in the middle of a sync run on a real local Ray.

Four deaths in one 6-step run, one of each kind the driver must survive:

* after step 2's weight sync, ``rollout-0`` dies BETWEEN two calls and the test waits until Ray has
  restarted it: no call fails, the worker just holds its initial weights again. Its next generate call
  returns groups sampled with version 0 although it was sent version 2: the driver must notice, count
  the restart, re-issue that chunk and push the current weights before it samples again;
* in step 4, ``rollout-1`` dies with a generate call in flight, and the reward worker dies with a
  scoring call in flight: the dead actor's calls fail, their groups are re-issued / re-scored, and the
  driver waits for the restarted actor before it sends it weights or work (calls to an actor Ray is
  still restarting fail at once);
* right before step 5's weight sync, ``rollout-0`` dies again: the sync itself fails, the driver waits
  for the restart and delivers the weights again.

"In flight" is made certain rather than likely: before the call, the test queues a ``time.sleep``
on the actor (actors run their calls in order), so the driver's call is still waiting behind it when
the process is killed. Scoring 16 short completions takes about a millisecond; without the hold the
kill could land after the reply.

Asserted: all 6 steps train; ``refocus_worker_restarts_total`` counts 3 rollout and 1 reward restart
(one per new process, however many calls of the dead process failed) and the driver logs each; the
ledger reconciles exactly (issued == trained + dropped by reason, trained ids unique, every trained
group generated); the killed calls' groups were re-issued; every trained group was sampled with the
weights of the step it trained in (the restarted worker's initial-weight samples never reach the
learner); and after every sync each worker's weight checksum equals the learner's.
"""

import json
import logging
import os
import signal
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import WORKER_RESTARTS
from deploy.config import load_run_config, shipped_configs
from deploy.actor_restarts import pid_call
from deploy.driver import Driver

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]

STEPS = 6
KILL_BETWEEN_CALLS_AFTER_STEP = 2  # rollout-0 dies once this step's weights are synced
KILL_IN_FLIGHT_AT_STEP = 4  # rollout-1 and the reward worker die during this step's collection
KILL_BEFORE_SYNC_OF_STEP = 5  # rollout-0 dies again right before this step's weight sync
RESTART_TIMEOUT_S = 300
HOLD_S = 60.0  # longer than any step: the call queued behind the hold is in flight at the kill
TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def _pid(handle) -> int:
    import ray

    return ray.get(pid_call(handle))


def _wait_restarted(handle, old_pid: int) -> int:
    """Poll until Ray has restarted the actor (its calls fail while it restarts); its new pid."""
    import ray

    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            pid = _pid(handle)
        except ray.exceptions.RayActorError:
            pid = old_pid
        if pid != old_pid:
            return pid
        time.sleep(0.5)
    raise TimeoutError(f"actor not restarted within {RESTART_TIMEOUT_S} s")


def _hold(handle):
    """Queue a long sleep on the actor; calls sent after it wait behind it (the ref is never awaited)."""
    return handle.__ray_call__.remote(lambda actor: time.sleep(HOLD_S))


class ChaosDriver(Driver):
    """The real driver; the overrides only add kills at chosen moments and record what they hit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.killed: dict[str, int] = {}  # kill label → pid killed
        self.lost_ids: dict[str, list[str]] = {}  # killed actor → group ids of its lost call
        self._watch_rollout0 = False

    def _kill(self, name: str, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.killed[name] = pid

    def _learn(self, batch):
        stats = super()._learn(batch)  # learner step + weight sync
        if self.step + 1 == KILL_BETWEEN_CALLS_AFTER_STEP:
            handle = self.fleet.workers[0].handle
            self._kill("rollout-0", _pid(handle))
            _wait_restarted(handle, self.killed["rollout-0"])
            self._watch_rollout0 = True
        return stats

    def _sync_weights(self, *, version):
        if version == KILL_BEFORE_SYNC_OF_STEP:  # nothing is in flight: only the sync can notice
            self._kill("rollout-0 again", _pid(self.fleet.workers[0].handle))
        return super()._sync_weights(version=version)

    def _dispatch(self, prompts, workers):
        rollout1 = self.fleet.workers[1]
        kill_now = (self.step + 1 == KILL_IN_FLIGHT_AT_STEP and "rollout-1" not in self.killed
                    and _gets_a_chunk(rollout1, prompts, workers))
        pid = _pid(rollout1.handle) if kill_now else None
        if kill_now:
            _hold(rollout1.handle)
        before = {w.name: len(w.busy) for w in workers}
        super()._dispatch(prompts, workers)
        sent = {w.name: [p.group_id for _, part in w.busy[before[w.name]:] for p in part] for w in workers}
        if self._watch_rollout0 and sent.get("rollout-0"):  # the first call the restarted worker gets
            self.lost_ids["rollout-0"] = sent["rollout-0"]
            self._watch_rollout0 = False
        if kill_now:
            self._kill("rollout-1", pid)
            self.lost_ids["rollout-1"] = sent["rollout-1"]

    def _score(self, groups):
        if self.step + 1 == KILL_IN_FLIGHT_AT_STEP and "reward" not in self.killed:
            pid = _pid(self.reward_pool.handles[0])
            _hold(self.reward_pool.handles[0])
            super()._score(groups)
            self._kill("reward", pid)
            self.lost_ids["reward"] = [g.group_id for g in groups]
        else:
            super()._score(groups)


def _gets_a_chunk(worker, prompts, workers) -> bool:
    """Whether ``Driver._dispatch(prompts, workers)`` sends ``worker`` a call: it cuts ``prompts`` in
    order into chunks of ceil(len / workers), one per worker, so a late worker may get none."""
    if worker not in workers or not prompts:
        return False
    return workers.index(worker) * -(-len(prompts) // len(workers)) < len(prompts)


def _restarts(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {sample.labels["role"]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == WORKER_RESTARTS}


def test_run_survives_killed_rollout_and_reward_workers(tiny_model_dir, data_dir, tmp_path, caplog):
    import ray

    caplog.set_level(logging.WARNING)  # the driver's, the fleet's, the reward pool's and the restart notices
    config = load_run_config(TINY_CPU, [
        f"model.path={tiny_model_dir}", f"data.path={data_dir}", f"train.output_dir={tmp_path / 'run'}",
        "train.mode=sync", f"train.steps={STEPS}", "train.checkpoint_every=0", "train.verify_weight_sync=true",
        "cluster.max_restarts=2", "rewards.custom_reward=rewards.examples:brevity",
        *[f"curriculum.stages.{i}.reward_weights.custom=1.0" for i in range(3)],
    ])
    driver = ChaosDriver(config)
    try:
        summary = driver.run()
        restarts = _restarts(driver.metrics_port)
        final_pids = {w.name: w.pid for w in driver.fleet.workers} | {"reward": driver.reward_pool.pids[0]}
    finally:
        driver.shutdown()
        ray.shutdown()

    assert summary.steps == STEPS and summary.version == STEPS
    assert set(driver.killed) == {"rollout-0", "rollout-1", "reward", "rollout-0 again"}
    assert final_pids["rollout-0"] not in (driver.killed["rollout-0"], driver.killed["rollout-0 again"])
    assert final_pids["rollout-1"] != driver.killed["rollout-1"] and final_pids["reward"] != driver.killed["reward"]

    # One restart per new process, by role, and a log line for each; each death seen the way it must be.
    assert restarts == {"rollout": 3.0, "reward": 1.0}
    messages = [r.getMessage() for r in caplog.records]
    assert sorted(m.split(" (pid")[0] for m in messages if "was restarted by Ray" in m) == [
        "reward worker 0 was restarted by Ray", "rollout worker rollout-0 was restarted by Ray",
        "rollout worker rollout-0 was restarted by Ray", "rollout worker rollout-1 was restarted by Ray"]
    assert any(m.startswith("rollout worker rollout-0 died (sampled with weights version 0, was sent 2)")
               for m in messages)
    assert any(m.startswith("rollout worker rollout-1 died (") for m in messages)
    assert any(m.startswith("reward worker died (") for m in messages)
    assert any(m.startswith("weight sync failed (") for m in messages)

    # Exact accounting.
    ledger = driver.ledger
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    trained_ids = [g for e in events for g in e["group_ids"]]
    assert len(trained_ids) == len(set(trained_ids)) == STEPS * config.train.prompts_per_step
    assert set(trained_ids) == ledger.trained
    assert ledger.reconciles() and not ledger.open
    dropped = Counter(ledger.dropped.values())
    assert len(ledger.issued) == len(ledger.trained) + sum(dropped.values()) == summary.ledger["issued"]
    assert ledger.trained <= ledger.generated and len(ledger.generated) >= len(ledger.trained)

    # The dead rollout calls' groups were re-issued under the same ids; the re-scored groups still count once.
    for name in ("rollout-0", "rollout-1"):
        assert driver.lost_ids[name] and all(ledger.reissued[g] >= 1 for g in driver.lost_ids[name]), name
    assert all(g in ledger.trained or g in ledger.dropped for g in driver.lost_ids["reward"])

    # Sync mode: every trained group was sampled by the weights of its own step, and every sync reached
    # every worker intact (the restarted ones included).
    for event in events:
        assert event["policy_versions"] == [event["step"] - 1] * len(event["group_ids"])
    assert [c["version"] for c in driver.fleet.checksums] == list(range(1, STEPS + 1))
    for check in driver.fleet.checksums:
        assert set(check["workers"]) == {"rollout-0", "rollout-1"}
        assert set(check["workers"].values()) == {check["learner"]}
