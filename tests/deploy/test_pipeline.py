"""The main job's stage bookkeeping: a finished SFT is reused, an unfinished or moved one is not."""

import json

from deploy.pipeline import finished_sft
from deploy.sft import SFT_SUMMARY_FILE


def test_a_finished_sft_is_found_only_when_it_ran_every_step(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_30"
    assert finished_sft(tmp_path, steps=30) is None  # never ran
    (tmp_path / SFT_SUMMARY_FILE).write_text(json.dumps({"steps": 30, "checkpoint": str(checkpoint)}))
    assert finished_sft(tmp_path, steps=30) is None  # its checkpoint is gone
    checkpoint.mkdir(parents=True)
    assert finished_sft(tmp_path, steps=30) == (str(checkpoint), str(checkpoint))  # older summaries: no "model"
    assert finished_sft(tmp_path, steps=40) is None  # the config now asks for more steps


def test_a_finished_sft_with_an_average_needs_the_average_too(tmp_path):
    checkpoint, average = tmp_path / "checkpoints" / "step_30", tmp_path / "average"
    checkpoint.mkdir(parents=True)
    (tmp_path / SFT_SUMMARY_FILE).write_text(json.dumps(
        {"steps": 30, "checkpoint": str(checkpoint), "model": str(average)}))
    assert finished_sft(tmp_path, steps=30) is None  # the average RL would start from is gone
    average.mkdir()
    assert finished_sft(tmp_path, steps=30) == (str(checkpoint), str(average))


def test_a_fresh_run_refuses_an_output_dir_that_holds_an_earlier_run(tmp_path, monkeypatch):
    """Without --resume, a second `refocus train` there retrained RL and then reported the earlier run's last
    checkpoint as its own (or failed at its first checkpoint, after the training). It now stops at once,
    before building anything, and says what to do; a partial checkpoint alone is no earlier run."""
    import pytest

    import deploy.pipeline as pipeline
    from deploy.config import load_run_config
    from deploy.driver import Driver

    out = tmp_path / "run"
    (out / "checkpoints" / "step_3").mkdir(parents=True)
    config = load_run_config(None, [f"train.output_dir={out}"])
    Driver(config)  # step_3 has no COMPLETE marker: nothing to continue
    (out / "checkpoints" / "step_3" / "COMPLETE").write_text("ok\n")
    monkeypatch.setattr("models.config.resolve_model_path", lambda *a, **k: pytest.fail("built a model first"))
    with pytest.raises(ValueError, match=r"train.output_dir: .* holds an earlier run \(checkpoint step_3\); pass "
                                         r"--resume"):
        pipeline.run_pipeline(config)
    with pytest.raises(ValueError, match="holds an earlier run"):
        Driver(config)
    Driver(config, resume=True)  # continuing that run is what --resume is for: no error


def test_a_fresh_sft_refuses_a_directory_that_holds_an_earlier_unfinished_one(tmp_path, monkeypatch):
    """A second `refocus sft --out DIR` (or `refocus train` after an interrupted SFT) without --resume trained
    from step 0 beside the earlier run's checkpoints and appended to its events; a later --resume could then take
    the earlier run's last checkpoint for its own. Both now stop before loading anything; a finished SFT is
    still reused by the main job, and --resume or --init-from are not refused."""
    import pytest

    import deploy.pipeline as pipeline
    from deploy.config import load_run_config
    from deploy.sft import SFT_STEP_KEY, run_sft
    from learner.checkpoint import write_trainer_state

    out = tmp_path / "run"
    sft_dir = out / "sft"
    (sft_dir / "checkpoints" / "step_100").mkdir(parents=True)
    (sft_dir / "checkpoints" / "step_100" / "COMPLETE").write_text("ok\n")
    write_trainer_state(sft_dir / "checkpoints" / "step_100", step=100, world_size=1, extra_state={SFT_STEP_KEY: 100})
    config = load_run_config(None, [f"train.output_dir={out}", "sft.steps=500"])
    # Building or loading the model fails the test (pytest.raises(ValueError) does not catch that failure).
    monkeypatch.setattr("models.config.resolve_model_path", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ValueError, match=r"--out: .*sft holds an earlier run \(checkpoint step_100\); pass --resume"):
        run_sft(config, out_dir=sft_dir)
    with pytest.raises(ValueError, match=r"train.output_dir: .*sft holds an earlier run \(checkpoint step_100\)"):
        pipeline.run_pipeline(config)
    for kwargs in ({"resume": True}, {"init_from": sft_dir / "checkpoints" / "step_100"}):
        with pytest.raises(pytest.fail.Exception, match="ran"):  # past the refusal, stopped at the model
            run_sft(config, out_dir=sft_dir, **kwargs)

    (sft_dir / SFT_SUMMARY_FILE).write_text(json.dumps(  # the SFT finished: the main job takes it as it is
        {"steps": 500, "checkpoint": str(sft_dir / "checkpoints" / "step_100")}))
    with pytest.raises(pytest.fail.Exception, match="ran"):  # past both refusals, stopped building the model
        pipeline.run_pipeline(config)
