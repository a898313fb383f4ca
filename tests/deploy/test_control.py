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
