"""Noticing Ray's restarts of the run's workers (rollout and reward alike).

Ray restarts a dead actor (``cluster.max_restarts``) from its constructor. Calls to an actor Ray is still
restarting fail at once (``ActorUnavailableError``), so ``await_ready`` polls until it answers; a restart is
told by a new process id and counted once per new process, however many failed calls saw the death.
"""

from __future__ import annotations

import logging
import os
import time

from actors.metrics import RunMetrics

log = logging.getLogger(__name__)

RESTART_WAIT_S = 600.0  # how long to wait for Ray to restart a dead worker (a vLLM engine starts slowly)
RESTART_POLL_S = 0.5  # between two probes of a restarting worker


def pid_call(handle):
    """A call returning the actor's process id (a restart gives a new one). The function is defined in
    here so cloudpickle ships it by value: the actor need not import this module."""

    def process_id(actor) -> int:
        return os.getpid()

    return handle.__ray_call__.remote(process_id)


def await_ready(handle) -> int:
    """The actor's process id once it takes calls again. ActorDiedError (no restarts left) propagates: the
    run cannot go on without the actor."""
    import ray

    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return ray.get(pid_call(handle))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(RESTART_POLL_S)


def restarted_pid(handle, known_pid: int | None, *, role: str, name: str, metrics: RunMetrics) -> int | None:
    """Wait for the actor to take calls; its new process id if it is not ``known_pid`` (the restart is then
    logged and counted under ``role``), else None."""
    pid = await_ready(handle)
    if pid == known_pid:
        return None
    log.warning("%s worker %s was restarted by Ray (pid %s → %s)", role, name, known_pid, pid)
    metrics.worker_restarts.labels(role=role).inc()
    return pid
