"""The rollout fleet: the driver's rollout workers, the weights they hold, scaling and Ray's restarts of them.

Runs in the driver process (it holds Ray handles, it is not an actor); ``deploy.driver.Driver`` decides
what each worker generates and owns the groups' bookkeeping, this class owns the workers:

* **start / scale**: each worker is a ``RolloutActor`` (a ``RolloutWorker`` that can receive weight
  buckets). One scaled up during a run starts in the background: the run goes on with the workers it has
  while the new engine loads, and ``admit_started`` (polled by the driver) gives it the current weights and
  work once it answers. One the cluster cannot place, or whose engine never comes up, is given up after
  ``cluster.worker_start_timeout_s``. A worker scaled down is retired: it gets no new work and is stopped
  once its calls have come back, so nothing is lost; one still starting is stopped at once.
* **calls in flight**: ``dispatch`` sends a worker a chunk of prompt groups and remembers, per call, the
  weights version the worker held when it was sent, so a restart between two calls can be noticed.
* **weights**: ``sync`` delivers a version's buckets to every worker and keeps them for workers that
  start or restart later; ``verify`` compares each worker's checksum with the learner's.
* **restarts**: Ray restarts a dead worker from its constructor, i.e. with its initial weights; ``recover``
  waits for it (``deploy.actor_restarts``) and forgets the weights it held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from actors.engines.base import state_dict_checksum
from actors.metrics import RunMetrics
from actors.rollout import RolloutWorker
from actors.types import PromptGroup
from actors.weights import WeightReceiverMixin, WeightSender, WeightSyncConfig
from deploy.actor_restarts import pid_call, restarted_pid
from deploy.config import RunConfig
from deploy.worker_env import actor_env

log = logging.getLogger(__name__)

# Why a worker scaled up during a run was given up (label of the start-failures metric).
START_TIMEOUT = "timeout"
START_DIED = "died"

# The rollout actor: a RolloutWorker that can also receive weight buckets (actors.weights).
RolloutActor = type("RolloutActor", (WeightReceiverMixin, RolloutWorker), {})


@dataclass
class FleetWorker:
    name: str
    handle: object
    version: int = 0  # weights version it holds
    busy: list = field(default_factory=list)  # [(generate ref, prompt groups)]
    sent_version: dict = field(default_factory=dict)  # generate ref → weights version it held when sent
    retiring: bool = False  # scaled down: gets no new work, leaves once its calls have come back
    pid: int | None = None  # process id of the incarnation the fleet knows (Ray restarts get new ones)
    starting: object | None = None  # while its engine starts: the call that answers once it takes calls
    started_at: float = 0.0  # time.monotonic() of its creation

    @property
    def admitted(self) -> bool:
        """Started and served the current weights: it takes part in syncs and may get work."""
        return self.starting is None


class RolloutFleet:
    """The run's rollout workers (see the module docstring).

    Args:
        config: the run config (``cluster`` sizes and restarts, ``rollout`` for each worker).
        model_path: the policy's model directory every worker starts from.
        metrics: the run's metrics (worker count, restarts).
    """

    def __init__(self, config: RunConfig, *, model_path: str | Path, metrics: RunMetrics):
        self.config = config
        self.model_path = str(model_path)
        self.metrics = metrics
        self.workers: list[FleetWorker] = []
        self.weight_sync = WeightSyncConfig()
        self.checksums: list[dict] = []  # per verified sync: the learner's checksum and each worker's
        self._next_index = 0
        self._buckets: list = []  # the current version's weight buckets (for workers that start later)
        # Async mode: the learner thread's weight sync (which may recover workers) and the main thread's scaling
        # take turns. A worker stopped in the middle of a sync failed it, and one started in the middle could be
        # recorded with weights it never got.
        self._lock = threading.RLock()
        self._tied_cache: bool | None = None

    # ------------------------------------------------------------------ workers
    def start(self, count: int) -> None:
        """Create ``count`` workers; returns at once. They take part in the run once admitted
        (``await_started`` at setup, ``admit_started`` during a run)."""
        with self._lock:
            for _ in range(count):
                self.workers.append(self._start_worker())
        self._set_gauges()

    def _start_worker(self) -> FleetWorker:
        name = f"rollout-{self._next_index}"
        self._next_index += 1
        handle = self._create_actor(name)
        return FleetWorker(name=name, handle=handle, starting=pid_call(handle), started_at=time.monotonic())

    def _create_actor(self, name: str):
        """A new rollout actor; returns its handle at once (its engine loads in the background)."""
        import ray

        c = self.config.cluster
        return (
            ray.remote(RolloutActor)
            .options(num_cpus=c.rollout_cpus, num_gpus=c.rollout_gpus, max_restarts=c.max_restarts,
                     runtime_env={"env_vars": actor_env()})  # also when joining a cluster (refocus submit)
            .remote(config=self.config.rollout, model_path=self.model_path, worker_id=name)
        )

    def await_started(self) -> None:
        """Wait until every worker takes calls and admit it (the run's start: there is nothing else to do)."""
        import ray

        for worker in self.workers:
            worker.starting = worker.starting or pid_call(worker.handle)
        pids = ray.get([w.starting for w in self.workers])
        with self._lock:
            for worker, pid in zip(self.workers, pids):
                self._admit(worker, pid)
        self._set_gauges()

    def admit_started(self, timeout_s: float | None = None) -> list[str]:
        """Admit every starting worker that now takes calls, serving it the current weights first; give up
        those still starting after ``timeout_s`` (default ``cluster.worker_start_timeout_s``) and those that died
        while starting. Never waits for an engine. Returns a line per worker given up."""
        import ray

        timeout_s = self.config.cluster.worker_start_timeout_s if timeout_s is None else timeout_s
        starting = self.starting()
        if not starting:
            return []
        ready, _ = ray.wait([w.starting for w in starting], num_returns=len(starting), timeout=0)
        given_up = []
        for worker in starting:
            if worker.starting in ready:
                try:
                    pid = ray.get(worker.starting)
                except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask again next time
                    worker.starting = pid_call(worker.handle)
                    continue
                except ray.exceptions.RayActorError as error:
                    given_up.append(self._give_up(worker, START_DIED, f"died while starting ({type(error).__name__})"))
                    continue
                with self._lock:
                    self._admit(worker, pid)
                log.info("scaled up: %s started in %.1f s and joined the run", worker.name,
                         time.monotonic() - worker.started_at)
            elif time.monotonic() - worker.started_at > timeout_s:
                given_up.append(self._give_up(worker, START_TIMEOUT, f"not started after {timeout_s:.0f} s (no room "
                                              "for it on the cluster, or its engine hangs)"))
        self._set_gauges()
        return given_up

    def _admit(self, worker: FleetWorker, pid: int) -> None:
        """Under the lock: a worker joining a run in progress gets the current weights before any work."""
        worker.pid, worker.starting = pid, None
        self.send_current([worker])

    def _give_up(self, worker: FleetWorker, reason: str, why: str) -> str:
        import ray

        ray.kill(worker.handle)
        with self._lock:
            self.workers.remove(worker)
        self.metrics.rollout_start_failures.labels(reason=reason).inc()
        line = f"rollout worker {worker.name} given up: {why}"
        log.warning(line)
        return line

    def active(self) -> list[FleetWorker]:
        """The workers that get new work (admitted, not retiring)."""
        return [w for w in self.workers if w.admitted and not w.retiring]

    def starting(self) -> list[FleetWorker]:
        """The workers whose engines are still starting (scaled up, not yet admitted)."""
        return [w for w in self.workers if not w.admitted]

    def _admitted(self) -> list[FleetWorker]:
        return [w for w in self.workers if w.admitted]

    def rescale(self, desired: int) -> None:
        """Start or retire workers until ``desired`` are active or starting; never waits for an engine. Scaling
        down stops starting workers first (they hold no work), then retires active ones, which finish their
        calls first."""
        import ray

        starting = self.starting()
        active = self.active()
        missing = desired - len(active) - len(starting)
        if missing > 0:
            self.start(missing)
            log.info("scaling up: starting %s", ", ".join(w.name for w in self.workers[-missing:]))
        surplus = -missing
        for worker in reversed(starting):
            if surplus <= 0:
                break
            ray.kill(worker.handle)
            with self._lock:
                self.workers.remove(worker)
            log.info("scaling down: %s stopped before it started", worker.name)
            surplus -= 1
        for worker in active[len(active) - max(surplus, 0):]:
            worker.retiring = True
            log.info("scaling down: retiring %s after its %d in-flight calls", worker.name, len(worker.busy))
        with self._lock:
            for worker in [w for w in self.workers if w.retiring and not w.busy]:
                ray.kill(worker.handle)
                self.workers.remove(worker)
                log.info("scaled down: %s stopped", worker.name)
        self._set_gauges()

    def _set_gauges(self) -> None:
        self.metrics.rollout_workers.set(len(self.active()))
        self.metrics.rollout_workers_starting.set(len(self.starting()))

    def kill(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker.handle)

    # ------------------------------------------------------------------ calls
    def dispatch(self, prompts: list[PromptGroup], workers: list[FleetWorker]) -> None:
        """One chunk of ``prompts`` to each of ``workers`` (in order; a late worker may get none)."""
        chunk = -(-len(prompts) // len(workers))
        for worker, start in zip(workers, range(0, len(prompts), chunk)):
            part = prompts[start : start + chunk]
            ref = worker.handle.generate_groups.remote(part)
            worker.busy.append((ref, part))
            worker.sent_version[ref] = worker.version

    def in_flight(self) -> dict:
        """Every generate call not yet handled: ref → (worker, its prompt groups)."""
        return {ref: (w, part) for w in self.workers for ref, part in w.busy}

    def generating(self) -> int:
        """How many prompt groups the workers hold in calls not yet handled."""
        return sum(len(part) for w in self.workers for _, part in w.busy)

    def returned(self, ref, worker: FleetWorker) -> int:
        """Forget a handled call of ``worker``; the weights version the worker held when it was sent."""
        worker.busy = [(r, p) for r, p in worker.busy if r != ref]
        return worker.sent_version.pop(ref, 0)

    def lowest_version(self) -> int:
        """The oldest weights version an active worker holds."""
        return min(w.version for w in self.active())

    # ------------------------------------------------------------------ restarts
    def recover(self, worker: FleetWorker) -> bool:
        """Wait for ``worker`` to take calls; True (restart counted, weights version reset to 0) when it is a
        new process. Several failed calls of one death find the new process id already known and count nothing."""
        with self._lock:
            pid = restarted_pid(worker.handle, worker.pid, role="rollout", name=worker.name, metrics=self.metrics)
            if pid is None:
                return False
            worker.pid, worker.version = pid, 0
            return True

    # ------------------------------------------------------------------ weights
    def sync(self, buckets: Iterable) -> None:
        """Make ``buckets`` (one version's weights, as the learner exports them) the current weights and
        deliver them to every worker."""
        with self._lock:
            self._buckets = list(buckets)
            self.send_current(self._admitted())  # one still starting is served when it is admitted

    def send_current(self, workers: list[FleetWorker]) -> None:
        """Deliver the current weights (if any yet) to ``workers``; a worker found dead on the way is waited
        for and served again (a receiver ignores a version it already holds)."""
        import ray

        with self._lock:
            if not self._buckets:
                return
            try:
                self._deliver(workers)
            except ray.exceptions.RayActorError as error:
                # A worker died since its last call (no call of ours saw it): wait for Ray to restart it.
                log.warning("weight sync failed (%s); waiting for restarted workers", type(error).__name__)
                for worker in workers:
                    self.recover(worker)
                self._deliver(workers)

    def _deliver(self, workers: list[FleetWorker]) -> None:
        sender = WeightSender(self.weight_sync)
        sender.connect([w.handle for w in workers])
        report = sender.sync(self._buckets)
        for worker in workers:
            worker.version = report.version

    def verify(self, version: int) -> dict:
        """Compare every worker's weight checksum with the current buckets'; records and returns the
        comparison, and raises if any worker differs. A worker Ray restarted since the sync holds its initial
        weights: it is served the current ones and asked again (a restart must not end the run)."""
        import ray

        import torch

        # The lock is held throughout, as by a sync: the weights and workers of one sync, not of one half-replaced
        # by another, and no worker stopped by `refocus scale` (async mode: the main thread) while it is asked.
        with self._lock:
            workers = self._admitted()
            named = [(name, t) for b in self._buckets for name, t in b.tensors]
            # The engines hold (and hash) the weights in their own dtype: a float32 learner's export is hashed as
            # a bfloat16 engine holds it, or every verification on a GPU would differ.
            engine_dtype = getattr(torch, self.config.rollout.engine.dtype)
            learner_sum = state_dict_checksum(named, tie_word_embeddings=self._tied(), dtype=engine_dtype)
            refs = [w.handle.weights_checksum.remote() for w in workers]
            worker_sums = []
            for worker, ref in zip(workers, refs):
                try:
                    checksum = ray.get(ref)
                except ray.exceptions.RayActorError:
                    checksum = None  # died since the sync
                if checksum != learner_sum and self.recover(worker):
                    self.send_current([worker])
                    checksum = ray.get(worker.handle.weights_checksum.remote())
                worker_sums.append(checksum)
            record = {"version": version, "learner": learner_sum,
                      "workers": dict(zip((w.name for w in workers), worker_sums))}
        self.checksums.append(record)
        if any(s != learner_sum for s in worker_sums):
            raise RuntimeError(f"weight sync of version {version}: worker checksums differ from the learner's: {record}")
        return record

    def _tied(self) -> bool:
        if self._tied_cache is None:
            from transformers import AutoConfig

            from actors.engines.base import ties_word_embeddings

            self._tied_cache = ties_word_embeddings(AutoConfig.from_pretrained(self.model_path))
        return self._tied_cache

