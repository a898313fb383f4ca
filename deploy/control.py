"""The control actor of a running job: how ``refocus scale`` and friends talk to a driver.

A plain class; the driver starts it as a named Ray actor (``control_actor_name(job)`` in the
``CONTROL_NAMESPACE`` namespace) and polls it between loop iterations, so a request takes effect
within a fraction of a second without the driver ever blocking on a client. Requests are validated
here, at the door: a bad one raises to the client and never reaches the driver.
"""

from __future__ import annotations

import time

CONTROL_NAMESPACE = "refocus"


def control_actor_name(job: str) -> str:
    """The Ray actor name of job ``job``'s control actor (the job id or the run's name)."""
    return f"refocus-control:{job}"


class JobControl:
    """Desired state set by clients, actual state reported by the driver."""

    def __init__(self, *, rollout_workers: int, min_workers: int = 1, max_workers: int = 1024,
                 capacity: int | None = None):
        """``capacity``: the most rollout workers the run's resources place (a local Ray's CPUs), if known."""
        if not min_workers <= rollout_workers <= max_workers:
            raise ValueError(f"rollout_workers {rollout_workers} outside [{min_workers}, {max_workers}]")
        self._limits = (min_workers, max_workers)
        self._capacity = capacity
        self._desired_workers = rollout_workers
        self._advance_requests: list[str] = []
        self._scale_error: str | None = None  # why the last scale-up could not be carried out
        self._status: dict = {"rollout_workers": rollout_workers, "step": 0, "updated": time.time()}

    # ---- clients
    def scale(self, rollout_workers: int) -> int:
        """Ask for ``rollout_workers`` rollout workers; returns the number now desired."""
        low, high = self._limits
        if type(rollout_workers) is not int or not low <= rollout_workers <= high:  # bool is an int subclass
            raise ValueError(f"--rollout-workers must be an integer in [{low}, {high}], got {rollout_workers!r}")
        if self._capacity is not None and rollout_workers > self._capacity:
            raise ValueError(f"--rollout-workers {rollout_workers}: the run's local Ray (cluster.num_cpus) places at "
                             f"most {self._capacity} beside its learner and reward workers; a worker it cannot place "
                             f"would never start")
        self._desired_workers = rollout_workers
        self._scale_error = None
        return rollout_workers

    def advance_stage(self, reason: str = "manual") -> None:
        """Ask the driver to move the curriculum to its next stage now."""
        self._advance_requests.append(reason)

    def status(self) -> dict:
        """What the driver last reported (step, workers, stage, ...) plus what is desired."""
        status = {**self._status, "desired_rollout_workers": self._desired_workers}
        if self._scale_error:
            status["scale_error"] = self._scale_error
        return status

    # ---- the driver
    def scale_failed(self, running: int, why: str) -> None:
        """Driver's call: workers asked for could not be started (``why``); the desired count falls back to the
        ``running`` ones (active or still starting), so the driver does not start them again and again, and
        ``why`` shows in the status until the next scale request."""
        self._desired_workers = max(self._limits[0], running)
        self._scale_error = why

    def poll(self, status: dict) -> dict:
        """Driver's call: report ``status``, receive the desired worker count and stage requests."""
        self._status = {**status, "updated": time.time()}
        requests, self._advance_requests = self._advance_requests, []
        return {"rollout_workers": self._desired_workers, "advance_stage": requests}
