"""SFT's wall time across a resume: ``max_seconds`` and ``wall_s`` count the seconds before it.

Run A trains ``STEPS`` SFT steps on the tiny model (the real ZeRO-3 learner group on a local Ray); its last
checkpoint records the seconds it trained (W). Then:

- A resumed with more steps and ``max_seconds`` = W stops at once: it has already trained W seconds. (Before
  the checkpoints recorded them, a resumed run counted from 0 and trained another W seconds.)
- A run started from A's checkpoint in another directory (``init_from``: the SFT control, which continues SFT
  for as long as RL trained) counts from 0, so the same ``max_seconds`` lets it train; one whose ``sft.steps``
  leaves it nothing to train is refused before it writes anything (it used to copy its start and report it),
  and so is one into a directory that holds a run past its start. A control stopped before its first
  checkpoint resumes from its start, not from the base model.
"""

import json
import shutil

import pytest

from deploy.config import load_run_config, shipped_configs
from deploy.sft import SFT_EVENTS_FILE, run_sft
from learner.checkpoint import read_trainer_state, step_dir_name

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 2
TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def _config(*, model, data, steps: int, max_seconds: float | None = None):
    overrides = [f"model.path={model}", f"data.path={data}", f"sft.steps={steps}", "sft.batch_samples=4",
                 "sft.micro_batch_samples=4", "sft.warmup_steps=1", "sft.average_last=0"]
    if max_seconds is not None:
        overrides.append(f"sft.max_seconds={max_seconds}")
    return load_run_config(TINY_CPU, overrides)


def _recorded_seconds(checkpoint) -> float:
    return float(read_trainer_state(checkpoint)["extra_state"]["wall_s"])


def test_a_resumed_sft_counts_the_seconds_before_it_and_a_control_counts_from_zero(tiny_model_dir, data_dir,
                                                                                     tmp_path):
    import ray

    try:
        first = run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS), out_dir=tmp_path / "a")
        checkpoint = tmp_path / "a" / "checkpoints" / step_dir_name(STEPS)
        assert first.steps == STEPS and first.checkpoint == str(checkpoint)
        trained = _recorded_seconds(checkpoint)
        assert 0.0 < trained <= first.wall_s

        resumed = run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS + 4, max_seconds=trained),
                          out_dir=tmp_path / "a", resume=True)
        assert resumed.steps == STEPS  # no step: the run had trained its max_seconds before the resume
        assert resumed.checkpoint == str(checkpoint)
        assert resumed.wall_s == trained  # exactly what it had trained: starting up and stopping are not training

        with pytest.raises(ValueError, match=f"sft.steps: {STEPS}, but --init-from .* is at step {STEPS}"):
            run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS), out_dir=tmp_path / "none_left",
                    init_from=checkpoint)  # a control needs steps beyond its start, or it trains nothing
        assert not (tmp_path / "none_left").exists()

        reported = []  # the progress bar's (done, total): a total near the steps it reaches, not sft.steps
        control = run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS + 1000, max_seconds=trained),
                          out_dir=tmp_path / "control", init_from=checkpoint,
                          progress=lambda done, total: reported.append((done, total)))
        assert control.steps > STEPS
        assert reported[-1] == (control.steps, control.steps)
        assert all(total < STEPS + 1000 for _, total in reported)
        events = [json.loads(line) for line in (tmp_path / "control" / SFT_EVENTS_FILE).read_text().splitlines()]
        assert [e["step"] for e in events] == list(range(STEPS + 1, control.steps + 1))
        assert 0.0 < events[0]["wall_s"] < events[-1]["wall_s"] <= control.wall_s
        last = tmp_path / "control" / "checkpoints" / step_dir_name(control.steps)
        assert control.wall_s == _recorded_seconds(last)  # exactly: the seconds spent writing it are not training

        # A control stopped before its first checkpoint: its --resume starts it again where it started, not from
        # the base model at step 0 (its record of --init-from says where).
        shutil.rmtree(tmp_path / "control" / "checkpoints")
        again = run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS + 1000, max_seconds=trained),
                        out_dir=tmp_path / "control", resume=True)
        events = [json.loads(line) for line in (tmp_path / "control" / SFT_EVENTS_FILE).read_text().splitlines()]
        assert again.steps > STEPS and [e["step"] for e in events] == list(range(STEPS + 1, again.steps + 1))

        # A second control into that directory: a --resume of it would continue the first one's later steps.
        with pytest.raises(ValueError, match=f"holds a run past --init-from's step {STEPS}"):
            run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS + 1000, max_seconds=trained),
                    out_dir=tmp_path / "control", init_from=checkpoint)
    finally:
        ray.shutdown()


def test_a_resumed_sft_trains_the_batches_the_uninterrupted_run_trains(tiny_model_dir, data_dir, tmp_path):
    """The next batch is built while the learner steps; the one built for a step that never ran (the first run
    ended at STEPS) must not shift the rows a resume trains next."""
    import ray

    def losses(out):
        return [json.loads(line)["loss/sft_nll"] for line in (out / SFT_EVENTS_FILE).read_text().splitlines()]

    try:
        run_sft(_config(model=tiny_model_dir, data=data_dir, steps=2 * STEPS), out_dir=tmp_path / "whole")
        run_sft(_config(model=tiny_model_dir, data=data_dir, steps=STEPS), out_dir=tmp_path / "halves")
        run_sft(_config(model=tiny_model_dir, data=data_dir, steps=2 * STEPS), out_dir=tmp_path / "halves",
                resume=True)
        whole, halves = losses(tmp_path / "whole"), losses(tmp_path / "halves")
        assert len(whole) == len(halves) == 2 * STEPS
        assert halves == pytest.approx(whole, rel=1e-5)
    finally:
        ray.shutdown()
