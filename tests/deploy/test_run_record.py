"""An RL run records its resolved config (``run_config.json``); a resume refuses a config that would train other
weights, before Ray or the SFT stage starts, and lets through what only says how long it runs, where, and how it
reports. Before, a resume took any config (the run's directory did not say what config made it).
The Driver's writing of the file needs Ray and runs in tests/e2e/test_resume.py."""

import json
import logging
from types import SimpleNamespace

import pytest

import deploy.pipeline as pipeline
from deploy.config import CONFIG_DIR, load_run_config
from deploy.driver import Driver
from deploy.run_record import RUN_CONFIG_FILE, check_rl_resume, rl_settings, settings_differences

MAIN = CONFIG_DIR / "small-cpu.yaml"


def _dump(*overrides):
    return load_run_config(MAIN, list(overrides)).model_dump(mode="json")


def test_rl_settings_keep_what_trains_and_leave_out_how_long_where_and_how_it_reports():
    base = rl_settings(_dump())
    temperatures = ("learner.temperature=1.0", "rollout.sampling.temperature=1.0")  # they must agree
    for overrides, keys in [(("learner.lr=0.001",), ["learner.lr"]), (("train.seed=3",), ["train.seed"]),
                            (temperatures, ["learner.temperature", "rollout.sampling.temperature"]),
                            (("rewards.iou.threshold=0.6",), ["rewards.iou.threshold"]),
                            (("data.train_limit=40",), ["data.train_limit"]),
                            (("model.path=/models/other",), ["model.path"]),
                            (("train.dynamic_sampling=false",), ["train.dynamic_sampling"])]:
        assert [d.split(":")[0] for d in settings_differences(base, rl_settings(_dump(*overrides)))] == keys, overrides
    for overrides in [("train.steps=300", "learner.max_steps=300"), ("cluster.rollout_workers=1",),
                      ("metrics.port=9999",), ("train.eval_limit=5",), ("train.checkpoint_every=7",),
                      ("sft.steps=900",), ("learner.log_entropy=true",), ("train.run_name=x",),
                      ("learner.device=cpu",)]:
        assert settings_differences(base, rl_settings(_dump(*overrides))) == [], overrides
    assert "model" not in rl_settings(_dump(), model_from_sft=True)


def test_a_resume_with_other_learning_settings_is_refused_and_other_changes_are_logged(tmp_path, caplog):
    out = tmp_path / "run"
    check_rl_resume(out, _dump(), setting="train.output_dir")  # runs from before the record: not checked
    out.mkdir()
    (out / RUN_CONFIG_FILE).write_text(json.dumps(_dump(f"train.output_dir={out}")))
    with pytest.raises(ValueError, match=r"train.output_dir: .*run holds an RL run trained with other settings "
                                         r"\(learner.lr: 0.0001 -> 0.001\); give this run another train.output_dir"):
        check_rl_resume(out, _dump(f"train.output_dir={out}", "learner.lr=0.001"), setting="train.output_dir")
    with caplog.at_level(logging.INFO, logger="deploy.run_record"):
        check_rl_resume(out, _dump(f"train.output_dir={out}", "train.steps=200", "learner.max_steps=200"),
                        setting="train.output_dir")
    assert "resume with a changed setting: train.steps: 100 -> 200" in caplog.text


def test_the_driver_and_the_main_job_refuse_before_anything_starts(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    recorded = load_run_config(MAIN, [f"train.output_dir={out}", f"model.path={out}/sft/average"])
    (out / RUN_CONFIG_FILE).write_text(recorded.model_dump_json())
    changed = load_run_config(MAIN, [f"train.output_dir={out}", "train.prompts_per_step=4",
                                     "learner.global_batch_samples=32"])
    with pytest.raises(ValueError, match=r"train.prompts_per_step: 8 -> 4"):
        Driver(changed.model_copy(update={"model": recorded.model}), resume=True)
    # The main job: before its SFT stage, whose model the recorded run trained from (so model.path is not compared).
    monkeypatch.setattr("deploy.sft.run_sft", lambda *a, **k: pytest.fail("reached SFT"))
    monkeypatch.setattr("models.config.resolve_model_path", lambda *a, **k: "/models/m")
    monkeypatch.setattr("deploy.training_data.prepare_training_data",
                        lambda *a, **k: SimpleNamespace(rows={}, bad_rows={}))
    with pytest.raises(ValueError, match=r"holds an RL run trained with other settings \(learner.global_batch"):
        pipeline.run_pipeline(changed, resume=True)
    same = load_run_config(MAIN, [f"train.output_dir={out}"])
    with pytest.raises(pytest.fail.Exception, match="reached SFT"):
        pipeline.run_pipeline(same, resume=True)
