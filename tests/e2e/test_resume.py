"""Resume after SIGKILL: a run killed right after a complete checkpoint continues where it stood.

Run A trains ``STEPS`` steps uninterrupted (``refocus train`` in a subprocess, a checkpoint every
step). Run B is the same config, same seeds, in its own output directory; it is killed with SIGKILL
(its whole process group: the driver and the local Ray it started) as soon as its step-``KILL_AFTER``
checkpoint carries the COMPLETE marker. A partial ``step_<KILL_AFTER + 1>`` directory (no marker, as a
crash between the rename and the marker leaves it) is planted next to it. Then ``Driver(config,
resume=True)`` continues run B in this process.

Asserted: the partial directory is skipped (the resumed run restores step KILL_AFTER, later writes a
complete step KILL_AFTER + 1 over it); the restored step, weights version, issue counter, curriculum
(stage and plateau-detector state) and sampler position equal run A's checkpoint at that step; the
resumed run's first step is KILL_AFTER + 1, and its prompt groups (ids "<row id>#<issue>") are
exactly run A's step KILL_AFTER + 1 groups; the event a crash left of a step after the checkpoint is
dropped, so the log holds each step once. Run B recorded its config, and a resume with another learning rate
is refused.

Why that comparison is exact: the prompt stream depends only on the sampler state and the curriculum
stage, both checkpointed, as long as dynamic sampling is off (its refills depend on the rewards the
samples happened to get) — so ``train.dynamic_sampling=false`` here. ``rollout.sampling.seed`` makes
runs A and B sample the same completions, and the driver trains a step's groups in issue order (not
the order they arrive in), so their checkpoints agree exactly up to the kill (checked too).
After the resume the rollout workers are new processes whose per-call seeds start over, so
completions, rewards and learner states after step KILL_AFTER + 1's draw are not compared.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.config import load_run_config, shipped_configs
from deploy.driver import EVENTS_FILE, Driver
from deploy.run_record import RUN_CONFIG_FILE
from learner.checkpoint import COMPLETE_MARKER, latest_complete, read_trainer_state, step_dir_name

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]

STEPS = 4
KILL_AFTER = 3  # tiny-cpu leaves stage 1 after at most 3 steps: the restored curriculum is in stage 2
SAMPLING_SEED = 1234
RUN_TIMEOUT_S = 400
TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def _overrides(*, model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model.path={model}", f"data.path={data}", f"train.output_dir={out}", "train.mode=sync",
        f"train.steps={STEPS}", "train.checkpoint_every=1", "train.dynamic_sampling=false", "train.eval_at_end=false",
        f"rollout.sampling.seed={SAMPLING_SEED}", "rewards.custom_reward=rewards.examples:brevity",
        *[f"curriculum.stages.{i}.reward_weights.custom=1.0" for i in range(3)],
    ]


def _train_command(overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "deploy.cli", "train", str(TINY_CPU)]
    for item in overrides:
        command += ["--set", item]
    return command


def _driver_state(checkpoint: Path) -> dict:
    return read_trainer_state(checkpoint)["extra_state"]


def _extra_state(checkpoint: Path) -> dict:
    """The driver's state in a checkpoint, without its wall seconds (which differ from run to run)."""
    return {key: value for key, value in _driver_state(checkpoint).items() if key != "wall_s"}


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVENTS_FILE).read_text().splitlines()]


def _session_pids(session: int) -> list[int]:
    """Live processes of the session ``session`` (run B's driver leads it; its Ray processes inherit it,
    though Ray workers move to process groups of their own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _, _, sid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            except (OSError, ValueError):
                continue
            if int(sid) == session and state != "Z":  # a zombie has exited, only its parent has not reaped it
                pids.append(int(entry.name))
    return pids


def _wait_session_gone(session: int, *, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (pids := _session_pids(session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def _kill_when_complete(process: subprocess.Popen, checkpoints: Path, *, step: int) -> Path:
    """SIGKILL run B's process group as soon as ``checkpoints/step_<step>`` is COMPLETE; returns it."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    target = checkpoints / step_dir_name(step)
    while not (target / COMPLETE_MARKER).is_file():
        assert process.poll() is None, f"run B exited ({process.returncode}) before its step-{step} checkpoint"
        assert time.monotonic() < deadline, f"no complete step-{step} checkpoint after {RUN_TIMEOUT_S} s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    # Ray processes that left the process group but not the session go the same way.
    for pid in _session_pids(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it exited meanwhile
            pass
    return target


def test_killed_run_resumes_from_its_last_complete_checkpoint(tiny_model_dir, data_dir, tmp_path):
    import ray

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    # A crashed run that left no checkpoint leaves its log: a fresh run there starts its own.
    run_a.mkdir()
    (run_a / EVENTS_FILE).write_text(json.dumps({"step": STEPS + 1, "stage": 0, "reward_total": -1.0}) + "\n")
    done = subprocess.run(_train_command(_overrides(model=tiny_model_dir, data=data_dir, out=run_a)),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    a_events = {e["step"]: e for e in _events(run_a)}
    assert sorted(a_events) == list(range(1, STEPS + 1))
    a_state = _extra_state(run_a / "checkpoints" / step_dir_name(KILL_AFTER))

    with (tmp_path / "b.log").open("w") as log_file:
        process = subprocess.Popen(_train_command(_overrides(model=tiny_model_dir, data=data_dir, out=run_b)),
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed_at = _kill_when_complete(process, run_b / "checkpoints", step=KILL_AFTER)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not _wait_session_gone(process.pid)
    # Same config, same seeds: B agrees with A up to the kill.
    assert _extra_state(killed_at) == a_state

    # A crash between a checkpoint's rename and its COMPLETE marker leaves this: it must be skipped.
    partial = run_b / "checkpoints" / step_dir_name(KILL_AFTER + 1)
    if partial.exists():  # B got that far before the kill landed: make it partial
        (partial / COMPLETE_MARKER).unlink()
    else:
        shutil.copytree(killed_at, partial, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
    assert latest_complete(run_b / "checkpoints") == killed_at
    # A crash after a step's event and before its checkpoint leaves that event behind; the resume drops it.
    with (run_b / EVENTS_FILE).open("a") as f:
        f.write(json.dumps({"step": KILL_AFTER + 1, "stage": 0, "reward_total": -1.0, "left_by": "crash"}) + "\n")
    trained_before = _driver_state(killed_at)["wall_s"]

    config = load_run_config(TINY_CPU, _overrides(model=tiny_model_dir, data=data_dir, out=run_b))
    # The run recorded the config it ran with; a resume that would train otherwise is refused before Ray starts.
    assert json.loads((run_b / RUN_CONFIG_FILE).read_text()) == config.model_dump(mode="json")
    with pytest.raises(ValueError, match=r"holds an RL run trained with other settings \(learner.lr: "):
        Driver(config.model_copy(update={"learner": config.learner.model_copy(update={"lr": 0.5})}), resume=True)
    driver = Driver(config, resume=True)
    try:
        driver.setup()
        # Nothing of step KILL_AFTER + 1 had reached the buffer's spill (else its groups would come back too).
        assert not driver.ledger.issued, f"run B was killed after step-{KILL_AFTER + 1} groups were buffered"
        restored = {"step": driver.step, "version": driver.version, "issue_counter": driver._issue_counter,
                    "curriculum": driver.curriculum.state_dict(), "sampler": driver.sampler.state_dict()}
        began = time.perf_counter()
        summary = driver.run()
        run_seconds = time.perf_counter() - began
    finally:
        driver.shutdown()
        ray.shutdown()

    assert a_state["step"] == a_state["version"] == KILL_AFTER
    assert json.loads(json.dumps(restored)) == a_state
    assert restored["curriculum"]["stage"] == 1  # the restored curriculum had advanced: a real comparison
    events = _events(run_b)
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))  # each step once, in order
    resumed = events[KILL_AFTER:]
    assert not any("left_by" in e for e in events)
    assert summary.steps == STEPS and summary.version == STEPS
    # Wall times count the seconds B trained before the kill too (the SFT control matches RL's whole time).
    assert trained_before > 1.0
    assert summary.wall_s == pytest.approx(trained_before + run_seconds, abs=0.5)
    assert trained_before < resumed[0]["wall_s"] <= resumed[-1]["wall_s"] <= summary.wall_s
    first, expected = resumed[0], a_events[KILL_AFTER + 1]
    assert sorted(g.split("#")[0] for g in first["group_ids"]) == sorted(g.split("#")[0] for g in expected["group_ids"])
    assert sorted(first["group_ids"]) == sorted(expected["group_ids"])
    assert first["stage"] == expected["stage"] == 1
    # The resumed run wrote its own complete step KILL_AFTER + 1 where the partial one was.
    assert (partial / COMPLETE_MARKER).is_file()
    assert read_trainer_state(partial)["step"] == KILL_AFTER + 1
    assert latest_complete(run_b / "checkpoints").name == step_dir_name(STEPS)
