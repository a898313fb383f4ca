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
