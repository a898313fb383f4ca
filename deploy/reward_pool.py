"""The reward pool: the driver's reward workers, the scoring calls in flight, and Ray's restarts of them.

Runs in the driver process (it holds Ray handles, it is not an actor). ``submit`` sends a batch of
trajectory groups to be scored: only texts, targets and frames travel (not images), one request per
curriculum stage present, each to the next worker in turn. ``take`` hands the batch back, rewards
applied, once every part of it has returned. A worker found dead on the way is waited for (Ray restarts
it from its constructor; it holds no state) and the batch's requests are sent again.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from actors.metrics import RunMetrics
from actors.reward import RewardWorker, apply_rewards, merge_batches, requests_for_groups
from actors.types import TrajectoryGroup
from deploy.config import RunConfig
from deploy.actor_restarts import pid_call, restarted_pid
from deploy.worker_env import actor_env

log = logging.getLogger(__name__)


@dataclass
class _Scoring:
    """One batch being scored: its groups, its requests (row numbers of each, request) and their calls."""

    groups: list[TrajectoryGroup]
    requests: list[tuple[list[int], object]]
    refs: list  # one call per request
    workers: list[int]  # the worker each call went to


class RewardPool:
    """The run's reward workers (see the module docstring).

    Args:
        config: the run config (``cluster.reward_workers``, ``reward_cpus``, ``max_restarts``; ``rewards``).
        metrics: the run's metrics (parse failures, restarts).
    """

    def __init__(self, config: RunConfig, *, metrics: RunMetrics):
        self.config = config
        self.metrics = metrics
        self.handles: list = []
        self.pids: list[int | None] = []  # process id of each worker's incarnation the pool knows
        self._turn = itertools.count()
        self._in_flight: dict = {}  # call ref → its batch's _Scoring

    def start(self, count: int) -> None:
        """Start ``count`` workers (returns at once)."""
        import ray

        c = self.config.cluster
        actor = ray.remote(RewardWorker).options(num_cpus=c.reward_cpus, max_restarts=c.max_restarts,
                                                 runtime_env={"env_vars": actor_env()})  # also when joining a cluster
        self.handles += [actor.remote(self.config.rewards) for _ in range(count)]
        self.pids += [None] * count

    def await_started(self) -> None:
        """Wait until every worker takes calls and learn its process id."""
        import ray

        self.pids = ray.get([pid_call(h) for h in self.handles])

    def kill(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle)

    # ------------------------------------------------------------------ scoring
    def submit(self, groups: list[TrajectoryGroup], *, stage_weights: dict, frames: list) -> None:
        """Score ``groups``: ``stage_weights`` per curriculum stage, ``frames`` one per trajectory (the frame
        of its final boxes, None for the image's own)."""
        requests = requests_for_groups(groups, stage_weights=stage_weights, frames=frames)
        self._send(_Scoring(groups=groups, requests=requests, refs=[], workers=[]))

    def _send(self, scoring: _Scoring) -> None:
        scoring.workers = [next(self._turn) % len(self.handles) for _ in scoring.requests]
        scoring.refs = [self.handles[w].score_request.remote(request)
                        for w, (_, request) in zip(scoring.workers, scoring.requests)]
        for ref in scoring.refs:
            self._in_flight[ref] = scoring

    def pending(self) -> list:
        """The scoring calls not yet handed to ``take``."""
        return list(self._in_flight)

    def scoring(self) -> int:
        """How many groups are being scored."""
        batches = {id(s): s for s in self._in_flight.values()}  # a batch of several requests counts once
        return sum(len(s.groups) for s in batches.values())

    def take(self, ref) -> list[TrajectoryGroup]:
        """Handle the finished call ``ref``: the batch's groups, rewards applied, once it was the batch's last
        part; [] while other parts are out, or when a worker died and the batch was sent again."""
        import ray

        scoring = self._in_flight.pop(ref)
        if any(r in self._in_flight for r in scoring.refs):
            return []
        try:
            results = ray.get(scoring.refs)
        except ray.exceptions.RayActorError as error:
            log.warning("reward worker died (%s); re-scoring %d groups", type(error).__name__, len(scoring.groups))
            for index in sorted(set(scoring.workers)):
                self._recover(index)
            self._send(scoring)
            return []
        total = sum(len(g.trajectories) for g in scoring.groups)
        batch = merge_batches([(rows, result) for (rows, _), result in zip(scoring.requests, results)], total=total)
        apply_rewards(scoring.groups, batch)
        for failure in batch.failures:
            if failure is not None:
                self.metrics.parse_failures.labels(reason=failure).inc()
        for violation in batch.strict_violations:
            if violation is not None:
                self.metrics.strict_violations.labels(reason=violation).inc()
        return scoring.groups

    def _recover(self, index: int) -> None:
        """Wait for worker ``index`` to take calls; count a restart once per new process. Only the driver's
        main thread scores, so no lock is needed."""
        pid = restarted_pid(self.handles[index], self.pids[index], role="reward", name=str(index), metrics=self.metrics)
        if pid is not None:
            self.pids[index] = pid
