"""``RolloutFleet``'s bookkeeping on a real local Ray: calls in flight, scaling down, restarts, weight checks.

The workers here are small stand-in actors (``EchoWorker``; ``HeldWeights`` with the real weight-receiving
end), made by hand or by the fleet's own start path (``StandInFleet``), not the vLLM rollout actor: a vLLM
engine takes tens of seconds to start on these CPUs, and what is tested is what the fleet records about its
actors' calls and processes. The real workers go through the same code in tests/e2e (``test_scaling``
starts and retires vLLM workers during a run, ``test_chaos`` kills them).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from actors.engines.base import state_dict_checksum
from actors.metrics import (ROLLOUT_START_FAILURES, ROLLOUT_WORKERS, ROLLOUT_WORKERS_STARTING, WORKER_RESTARTS,
                            RunMetrics)
from actors.weights import WeightReceiverMixin
from deploy.config import load_run_config, shipped_configs
from deploy.actor_restarts import await_ready
from deploy.rollout_fleet import FleetWorker, RolloutFleet
from learner.export import WeightBucket

ray = pytest.importorskip("ray")

TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


class EchoWorker:
    """Answers ``generate_groups`` with the prompts it was given (after ``delay_s``)."""

    def generate_groups(self, prompts: list, delay_s: float = 0.0) -> list:
        time.sleep(delay_s)
        return list(prompts)


def fleet_of(count: int, *, max_restarts: int = 0) -> RolloutFleet:
    fleet = RolloutFleet(load_run_config(TINY_CPU), model_path="unused: no worker is started by the fleet",
                         metrics=RunMetrics())
    actor = ray.remote(EchoWorker).options(num_cpus=0, max_restarts=max_restarts)
    fleet.workers = [FleetWorker(name=f"echo-{i}", handle=actor.remote()) for i in range(count)]
    fleet.await_started()
    return fleet


def test_dispatch_cuts_the_prompts_in_order_and_remembers_each_calls_weights(ray_cluster):
    fleet = fleet_of(3)
    for worker, version in zip(fleet.workers, (2, 3, 3)):
        worker.version = version
    prompts = [f"p{i}" for i in range(7)]
    fleet.dispatch(prompts, fleet.workers)  # ceil(7 / 3) = 3 per call: 3 + 3 + 1
    calls = fleet.in_flight()
    assert [part for _, part in calls.values()] == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6"]]
    assert fleet.generating() == 7
    for worker in fleet.workers:  # new weights arrive while the calls are out
        worker.version = 4
    for (ref, (worker, part)), sent_with in zip(calls.items(), (2, 3, 3)):
        assert ray.get(ref) == part
        assert fleet.returned(ref, worker) == sent_with  # the version the call was sent with, not the current one
    assert fleet.generating() == 0 and fleet.in_flight() == {}
    assert all(not w.busy and not w.sent_version for w in fleet.workers)

    fleet.workers[2].version = 1
    fleet.dispatch(["q0", "q1"], fleet.workers)  # one each to the first two; the third gets no call
    assert [len(w.busy) for w in fleet.workers] == [1, 1, 0]
    assert fleet.lowest_version() == 1
    fleet.kill()


def test_a_worker_scaled_down_finishes_its_call_before_it_stops(ray_cluster):
    fleet = fleet_of(2)
    slow = fleet.workers[1]
    ref = slow.handle.generate_groups.remote(["p0"], delay_s=1.0)
    slow.busy.append((ref, ["p0"]))
    fleet.rescale(1)
    assert slow.retiring and slow in fleet.workers  # its call is still out: it stays
    assert fleet.active() == [fleet.workers[0]] and fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS) == 1
    assert ray.get(ref) == ["p0"]  # the call in flight was not lost
    fleet.returned(ref, slow)
    fleet.rescale(1)
    assert fleet.workers == fleet.active() and slow not in fleet.workers
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):  # stopped (ray.kill lands a moment later: a call made
        while time.monotonic() < deadline:            # at once could still run, as one did under load)
            ray.get(slow.handle.generate_groups.remote(["p1"]), timeout=60)
            time.sleep(0.2)
    fleet.kill()


def test_a_restart_is_counted_once_and_its_weights_are_forgotten(ray_cluster):
    fleet = fleet_of(1, max_restarts=1)
    worker = fleet.workers[0]
    worker.version = 5
    old_pid = worker.pid
    os.kill(old_pid, signal.SIGKILL)
    assert fleet.recover(worker) is True  # waits while Ray restarts it
    assert worker.pid not in (None, old_pid) and worker.pid == await_ready(worker.handle)
    assert worker.version == 0  # a restarted actor holds its initial weights
    assert fleet.recover(worker) is False  # a second failed call of the same death counts nothing
    assert fleet.metrics.registry.get_sample_value(WORKER_RESTARTS, {"role": "rollout"}) == 1
    fleet.send_current([worker])  # no weights synced yet: nothing to send, nothing fails
    assert worker.version == 0
    fleet.kill()


class HeldWeights(WeightReceiverMixin):
    """Takes weights through the real receiving end and holds them as an engine of ``dtype`` does (floating
    ones cast, integer buffers as they are); hashes them as the HF engine hashes its state dict."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.named: list = []

    def load_weights(self, named_tensors, *, version: int) -> None:
        self.named = [(n, t.to(self.dtype) if t.is_floating_point() else t) for n, t in named_tensors]

    def weights_checksum(self) -> str:
        return state_dict_checksum(self.named, tie_word_embeddings=False)


def test_verify_compares_the_learners_weights_as_a_bfloat16_engine_holds_them(ray_cluster, tiny_model_dir):
    fleet = RolloutFleet(load_run_config(TINY_CPU, ["rollout.engine.dtype=bfloat16"]), model_path=tiny_model_dir,
                         metrics=RunMetrics())
    actor = ray.remote(HeldWeights).options(num_cpus=0)
    fleet.workers = [FleetWorker(name=f"bf16-{i}", handle=actor.remote(torch.bfloat16)) for i in range(2)]
    # float32 values that bfloat16 rounds: hashed as float32 they could never match a bfloat16 engine
    exported = [("w", torch.tensor([1.0, 1.0 + 2**-12])), ("steps", torch.tensor([3]))]
    fleet.sync([WeightBucket(version=1, index=0, is_last=True, tensors=exported)])
    record = fleet.verify(1)
    assert set(record["workers"].values()) == {record["learner"]}
    ray.get(fleet.workers[1].handle.load_weights.remote([("w", torch.zeros(2)), exported[1]], version=1))
    with pytest.raises(RuntimeError, match="differ"):  # a worker holding other weights is still caught
        fleet.verify(1)
    fleet.kill()


def test_verify_serves_a_worker_restarted_since_the_sync_and_asks_again(ray_cluster, tiny_model_dir):
    fleet = RolloutFleet(load_run_config(TINY_CPU), model_path=tiny_model_dir, metrics=RunMetrics())
    actor = ray.remote(HeldWeights).options(num_cpus=0, max_restarts=1)
    fleet.workers = [FleetWorker(name=f"held-{i}", handle=actor.remote(torch.float32)) for i in range(2)]
    fleet.await_started()
    exported = [("w", torch.tensor([1.0, 2.0]))]
    fleet.sync([WeightBucket(version=1, index=0, is_last=True, tensors=exported)])
    os.kill(fleet.workers[1].pid, signal.SIGKILL)  # dies after the sync, before the check
    record = fleet.verify(1)
    assert set(record["workers"].values()) == {record["learner"]}
    assert fleet.workers[1].version == 1
    assert fleet.metrics.registry.get_sample_value(WORKER_RESTARTS, {"role": "rollout"}) == 1
    fleet.kill()


class SlowReceiver(HeldWeights):
    """Takes three seconds over each weights bucket, so that a sync is still going when the fleet is rescaled."""

    def receive_weight_bucket(self, message):
        time.sleep(3.0)
        return super().receive_weight_bucket(message)


def test_scaling_down_during_a_weight_sync_waits_for_it(ray_cluster, tiny_model_dir):
    """Async mode: the learner thread syncs weights while the main thread applies `refocus scale`. They take
    turns: a worker list changed in the middle of a sync could leave a worker recorded with weights it never
    got (or, stopped mid-sync, fail the sync's calls)."""
    import threading

    fleet = RolloutFleet(load_run_config(TINY_CPU), model_path=tiny_model_dir, metrics=RunMetrics())
    actor = ray.remote(SlowReceiver).options(num_cpus=0)
    fleet.workers = [FleetWorker(name=f"slow-{i}", handle=actor.remote(torch.float32)) for i in range(2)]
    fleet.await_started()
    errors: list = []

    def learner_thread() -> None:
        try:
            fleet.sync([WeightBucket(version=1, index=0, is_last=True, tensors=[("w", torch.ones(2))])])
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    thread = threading.Thread(target=learner_thread)
    thread.start()
    deadline = time.monotonic() + 60
    while fleet._lock.acquire(blocking=False):  # until the sync holds the fleet (then it waits 3 s on the workers)
        fleet._lock.release()
        assert time.monotonic() < deadline, "the sync never started"
        time.sleep(0.01)
    fleet.rescale(1)
    assert not thread.is_alive()  # the scale-down waited for the sync to finish
    thread.join(60)
    assert errors == [] and [w.name for w in fleet.workers] == ["slow-0"] and fleet.workers[0].version == 1
    fleet.kill()


class SlowStart(HeldWeights):
    """Takes three seconds to start, as an engine loading its model does (briefly)."""

    def __init__(self, dtype: torch.dtype) -> None:
        time.sleep(3.0)
        super().__init__(dtype)


class NeverStarts(HeldWeights):
    """An engine that fails while loading."""

    def __init__(self, dtype: torch.dtype) -> None:
        raise RuntimeError("no such model")


class StandInFleet(RolloutFleet):
    """The real fleet, creating stand-in actors (``actor``, a configured ``ray.remote`` class) for its workers."""

    def __init__(self, actor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.actor = actor

    def _create_actor(self, name: str):
        return self.actor.remote(torch.float32)


def running_fleet(actor, model_path, *, workers: int = 1) -> StandInFleet:
    """A fleet of ``workers`` stand-ins (``actor``), started and admitted as at a run's setup."""
    fleet = StandInFleet(actor, config=load_run_config(TINY_CPU), model_path=model_path, metrics=RunMetrics())
    fleet.start(workers)
    fleet.await_started()
    return fleet


def weights(version: int) -> list[WeightBucket]:
    return [WeightBucket(version=version, index=0, is_last=True, tensors=[("w", torch.full((2,), float(version)))])]


def admit_until(fleet: RolloutFleet, done, *, timeout_s: float = 60.0) -> list[str]:
    """Poll ``admit_started`` as the driver's loop does until ``done()``; the lines of workers given up."""
    given_up: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "nothing happened to the starting worker"
        given_up += fleet.admit_started()
        time.sleep(0.1)
    return given_up


def test_a_worker_scaled_up_during_a_run_joins_once_started_with_the_current_weights(ray_cluster, tiny_model_dir):
    """`refocus scale` must not stop the run while a new engine loads: the run goes on with the workers it has,
    and the new one is served the weights current when it answers, not those of when it was asked for."""
    fleet = running_fleet(ray.remote(SlowStart).options(num_cpus=0), tiny_model_dir)
    fleet.sync(weights(1))
    fleet.rescale(2)
    first, new = fleet.workers
    assert not new.admitted and new.pid is None  # returned without waiting for its 3-second start
    assert fleet.active() == [first]
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS) == 1
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS_STARTING) == 1
    fleet.sync(weights(2))  # the learner goes on: a sync while it starts leaves it out
    assert (first.version, new.version) == (2, 0)
    assert fleet.verify(2)["workers"].keys() == {first.name}
    assert fleet.admit_started() == []  # still starting: nothing waits, nothing is given up
    admit_until(fleet, lambda: new.admitted)
    assert new.version == 2 and new.pid == await_ready(new.handle)  # version 2 only, never version 1
    assert fleet.active() == [first, new]
    assert set(fleet.verify(2)["workers"]) == {first.name, new.name}
    assert fleet.recover(new) is False  # its process is known: nothing to count as a restart
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS) == 2
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS_STARTING) == 0
    fleet.kill()


def test_a_worker_the_cluster_cannot_place_is_given_up_and_the_run_goes_on(ray_cluster, tiny_model_dir):
    fleet = running_fleet(ray.remote(HeldWeights).options(num_cpus=0), tiny_model_dir)
    fleet.actor = ray.remote(HeldWeights).options(num_cpus=10_000)  # more than any node of this Ray has
    fleet.rescale(2)
    assert fleet.admit_started(timeout_s=30.0) == []  # not yet past its time
    time.sleep(0.5)
    [line] = fleet.admit_started(timeout_s=0.2)
    assert line.startswith("rollout worker rollout-1 given up: not started after 0 s (no room for it")
    assert [w.name for w in fleet.workers] == [w.name for w in fleet.active()] == ["rollout-0"]
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_START_FAILURES, {"reason": "timeout"}) == 1
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS_STARTING) == 0
    fleet.kill()


def test_a_worker_that_dies_while_starting_is_given_up(ray_cluster, tiny_model_dir):
    fleet = running_fleet(ray.remote(HeldWeights).options(num_cpus=0), tiny_model_dir)
    fleet.actor = ray.remote(NeverStarts).options(num_cpus=0, max_restarts=0)
    fleet.rescale(2)
    [line] = admit_until(fleet, lambda: len(fleet.workers) == 1)
    assert "died while starting" in line
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_START_FAILURES, {"reason": "died"}) == 1
    fleet.kill()


def test_scaling_down_stops_workers_still_starting_before_it_retires_working_ones(ray_cluster, tiny_model_dir):
    fleet = running_fleet(ray.remote(SlowStart).options(num_cpus=0), tiny_model_dir, workers=2)
    fleet.rescale(4)
    assert [w.admitted for w in fleet.workers] == [True, True, False, False]
    fleet.rescale(3)  # one of the two still starting goes; nobody retires
    assert [(w.admitted, w.retiring) for w in fleet.workers] == [(True, False), (True, False), (False, False)]
    fleet.rescale(1)  # the last starting one, then one working one
    assert [w.retiring for w in fleet.workers] == [False]
    assert fleet.metrics.registry.get_sample_value(ROLLOUT_WORKERS_STARTING) == 0
    fleet.kill()


class SlowChecksum(HeldWeights):
    """Takes three seconds to hash its weights, so that a verification is still asking when the fleet is rescaled."""

    def weights_checksum(self) -> str:
        time.sleep(3.0)
        return super().weights_checksum()


def test_scaling_down_during_a_verification_waits_for_it(ray_cluster, tiny_model_dir):
    """Async mode: the learner thread verifies a sync while the main thread applies `refocus scale`. A worker
    stopped while it was asked for its checksum ended the run (ActorDiedError); they take turns, as with a sync."""
    import threading

    fleet = RolloutFleet(load_run_config(TINY_CPU), model_path=tiny_model_dir, metrics=RunMetrics())
    actor = ray.remote(SlowChecksum).options(num_cpus=0)
    fleet.workers = [FleetWorker(name=f"slow-{i}", handle=actor.remote(torch.float32)) for i in range(2)]
    fleet.await_started()
    fleet.sync([WeightBucket(version=1, index=0, is_last=True, tensors=[("w", torch.ones(2))])])
    outcome: list = []

    def learner_thread() -> None:
        try:
            outcome.append(fleet.verify(1))
        except BaseException as error:  # surfaced by the assertion below
            outcome.append(error)

    thread = threading.Thread(target=learner_thread)
    thread.start()
    deadline = time.monotonic() + 60
    while fleet._lock.acquire(blocking=False):  # until the verification holds the fleet
        fleet._lock.release()
        assert time.monotonic() < deadline, "the verification never started"
        time.sleep(0.01)
    fleet.rescale(1)
    thread.join(60)
    [record] = outcome
    assert isinstance(record, dict) and set(record["workers"]) == {"slow-0", "slow-1"}
    assert [w.name for w in fleet.workers] == ["slow-0"]
    fleet.kill()
