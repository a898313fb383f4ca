"""The driver's step events: which stage's rewards a step reports, and the log across a resume."""

from __future__ import annotations

import json

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup
from deploy.driver import reported_stage, stage_reward_means
from deploy.report import read_events
from deploy.run_record import trim_events


def _group(stage: int, rewards: list[dict[str, float]]) -> TrajectoryGroup:
    prompt = PromptGroup(group_id=f"r#{stage}", prompt_id="r", task="camo", difficulty="easy", question="?",
                         image=b"", target=Target(present=False, category=None, boxes=[], width=8, height=8),
                         stage=stage)
    trajectories = [Trajectory(sample_index=i, prompt_ids=[1], completion_ids=[2], behaviour_logprobs=[0.0],
                               loss_mask=[1], completion_text="", rewards=r, reward=sum(r.values()))
                    for i, r in enumerate(rewards)]
    return TrajectoryGroup(prompt=prompt, trajectories=trajectories, policy_version=0)


def test_a_step_reports_the_rewards_of_the_stage_it_names():
    # Stage 0 pays format and presence; stage 1 adds the category. Two stage-0 groups arrive after the
    # transition to stage 1 (async), beside one stage-1 group.
    old = [_group(0, [{"format": 1.0, "presence": 0.0}, {"format": 1.0, "presence": 1.0}]),
           _group(0, [{"format": 0.0, "presence": 1.0}, {"format": 1.0, "presence": 1.0}])]
    new = [_group(1, [{"format": 1.0, "presence": 1.0, "category": 1.0}, {"format": 1.0, "presence": 0.0,
                                                                           "category": 0.0}])]
    means = stage_reward_means(old + new)
    assert means == {0: {"total": 1.5, "format": 0.75, "presence": 0.75},
                     1: {"total": 2.0, "format": 1.0, "presence": 0.5, "category": 0.5}}
    assert reported_stage(means, current=1) == 1
    # Only groups from before the transition: the event names stage 0, whose rewards it shows.
    assert reported_stage(stage_reward_means(old), current=1) == 0
    assert reported_stage({0: {}, 2: {}}, current=3) == 2


def test_a_resume_drops_the_events_of_steps_after_its_checkpoint(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"step": s, "stage": 0, "reward_total": float(s)}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join([*lines[:2], "not json", json.dumps(["a list"]), *lines[2:]]) + "\n")
    trim_events(path, last_step=2)
    # Steps 3 and 4 were trained after the checkpoint of step 2: gone. Lines that name no step stay as they were.
    kept = "\n".join([*lines[:2], "not json", json.dumps(["a list"])]) + "\n"
    assert path.read_text() == kept
    trim_events(path, last_step=2)  # nothing left to drop: the file is untouched
    assert path.read_text() == kept
    trim_events(tmp_path / "absent.jsonl", last_step=0)  # a run without a log yet
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_line_a_crash_cut_is_dropped_so_the_next_event_is_not_lost(tmp_path):
    path = tmp_path / "events.jsonl"
    whole = [json.dumps({"step": s, "stage": 0, "reward_total": 1.0}) for s in (1, 2)]
    path.write_text("\n".join(whole) + "\n" + '{"step": 3, "sta')
    trim_events(path, last_step=2)
    assert path.read_text() == "\n".join(whole) + "\n"
    with path.open("a") as f:  # the resumed run logs step 3 again
        f.write(json.dumps({"step": 3, "stage": 0, "reward_total": 2.0}) + "\n")
    assert [e["step"] for e in read_events(path)[0]] == [1, 2, 3]


def test_a_whole_last_event_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "events.jsonl"
    first, second = (json.dumps({"step": s, "stage": 0, "reward_total": 1.0}) for s in (1, 2))
    path.write_text(first + "\n" + second)
    trim_events(path, last_step=2)
    assert path.read_text() == first + "\n" + second + "\n"
