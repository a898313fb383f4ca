"""JobControl, the control actor's class, called directly: requests are checked at the door."""

from __future__ import annotations

import pytest

from deploy.control import JobControl


def test_scale_takes_a_worker_count_within_the_bounds_and_nothing_else():
    control = JobControl(rollout_workers=2, min_workers=1, max_workers=4)
    assert control.scale(4) == 4 and control.status()["desired_rollout_workers"] == 4
    for bad in (0, 5, 2.0, "3", True):  # True would have asked for one worker
        with pytest.raises(ValueError, match="must be an integer in \\[1, 4\\]"):
            control.scale(bad)
    assert control.status()["desired_rollout_workers"] == 4  # a refused request changes nothing


def test_scale_refuses_more_workers_than_a_local_ray_places():
    """small-cpu on its 2-CPU local Ray: the learner (1 CPU) and the reward worker (0.25) leave 0.75, one rollout
    worker of 0.5; two would need 2.25 of the 2, so Ray would never place the second (the driver would give it up after
    cluster.worker_start_timeout_s); refused at the door, the operator sees why at once."""
    from deploy.config import load_run_config, shipped_configs

    config = load_run_config(next(p for p in shipped_configs() if p.name == "small-cpu.yaml"))
    assert config.local_rollout_capacity() == 1
    control = JobControl(rollout_workers=1, max_workers=config.cluster.max_rollout_workers,
                         capacity=config.local_rollout_capacity())
    with pytest.raises(ValueError, match="places at most 1"):
        control.scale(2)
    assert control.scale(1) == 1
    joining = load_run_config(next(p for p in shipped_configs() if p.name == "small-cpu.yaml"),
                              ["cluster.address=auto"])
    assert joining.local_rollout_capacity() is None  # a cluster's size is not known at load


def test_a_scale_up_the_driver_gave_up_falls_back_to_the_running_workers_and_says_why():
    control = JobControl(rollout_workers=2, min_workers=2, max_workers=8)
    control.scale(5)
    control.scale_failed(3, "rollout worker rollout-4 given up: not started after 600 s")
    status = control.status()
    assert status["desired_rollout_workers"] == 3  # the driver will not start the missing one again and again
    assert status["scale_error"] == "rollout worker rollout-4 given up: not started after 600 s"
    assert control.poll({"rollout_workers": 3})["rollout_workers"] == 3
    control.scale_failed(1, "every new worker died while starting")
    assert control.status()["desired_rollout_workers"] == 2  # never below the run's lower bound
    control.scale(4)  # a new request clears the old error
    assert "scale_error" not in control.status() and control.status()["desired_rollout_workers"] == 4
