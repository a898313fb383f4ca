"""An SFT records what determines its weights (``sft_settings.json``); a resume, or the main job taking a finished
SFT from its output directory, refuses one trained with other settings and names them. Before, the main job took a
finished SFT whatever its settings (only its step count was checked)."""

import json
from types import SimpleNamespace

import pytest

import deploy.pipeline as pipeline
from deploy.config import CONFIG_DIR, load_run_config
from deploy.run_record import settings_differences
from deploy.sft import SFT_SETTINGS_FILE, SFT_SUMMARY_FILE, check_same_settings, run_sft, sft_settings

MODEL = "/models/m"
MAIN = CONFIG_DIR / "small-cpu.yaml"


def _settings(*overrides):
    return sft_settings(load_run_config(MAIN, list(overrides)), model_path=MODEL)


def test_differences_are_listed_by_dotted_key():
    recorded = {"sft": {"lr": 0.0005, "think": "brief"}, "data": {"path": "/d"}}
    current = {"sft": {"lr": 0.001, "think": "brief"}, "data": {"path": "/d", "train_limit": 500}}
    assert settings_differences(recorded, current) == ["data.train_limit: None -> 500", "sft.lr: 0.0005 -> 0.001"]
    assert settings_differences(recorded, recorded) == []


def test_what_trains_the_weights_differs_and_what_only_runs_or_reports_them_does_not():
    base = _settings()
    for override, key in (("sft.lr=0.001", "sft.lr"), ("rollout.prompt.system=brief", "rollout.prompt.system"),
                          ("data.train_limit=500", "data.train_limit"), ("sft.freeze_vision=true",
                                                                        "learner.freeze_vision"),
                          # rows whose answer is longer than the rollout may write are left out of SFT
                          ("rollout.sampling.max_tokens=48", "rollout.sampling.max_tokens")):
        assert [d.split(":")[0] for d in settings_differences(base, _settings(override))] == [key], override
    # how long it runs, how it reports, and RL's own fields: a resume may extend a run; RL variants share an SFT
    for overrides in (["sft.steps=900"], ["sft.max_seconds=60"], ["sft.log_every=5"], ["learner.lr=0.0002"],
                      ["learner.eps_high=0.4"], ["data.rl_mirror=true"],
                      ["learner.temperature=1.0", "rollout.sampling.temperature=1.0"],
                      ["learner.gradient_checkpointing=true"], ["learner.device=cpu"]):  # and where and how it runs
        assert settings_differences(base, _settings(*overrides)) == [], overrides
    assert sft_settings(load_run_config(MAIN, []), model_path="/models/../models/m") == base  # paths resolved


def test_a_directory_without_a_record_is_not_checked_and_one_with_another_is_refused(tmp_path):
    check_same_settings(tmp_path, _settings(), setting="--out")  # runs from before the record
    (tmp_path / SFT_SETTINGS_FILE).write_text(json.dumps(_settings()))
    check_same_settings(tmp_path, _settings("sft.steps=900"), setting="--out")
    with pytest.raises(ValueError, match=r"--out: .* holds an SFT trained with other settings \(sft.lr: 0.0005 -> "
                                         r"0.001\); give this run another --out"):
        check_same_settings(tmp_path, _settings("sft.lr=0.001"), setting="--out")


def test_resume_and_the_main_job_refuse_an_sft_trained_otherwise(tmp_path, monkeypatch):
    out = tmp_path / "run"
    sft_dir = out / "sft"
    checkpoint = sft_dir / "checkpoints" / "step_500"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("ok\n")
    (sft_dir / SFT_SUMMARY_FILE).write_text(json.dumps({"steps": 500, "checkpoint": str(checkpoint)}))
    recorded = load_run_config(None, [f"train.output_dir={out}", "sft.steps=500"])
    (sft_dir / SFT_SETTINGS_FILE).write_text(json.dumps(sft_settings(recorded, model_path=MODEL)))
    monkeypatch.setattr("models.config.resolve_model_path", lambda *a, **k: MODEL)
    monkeypatch.setattr("deploy.training_data.prepare_training_data",
                        lambda *a, **k: SimpleNamespace(rows={}, bad_rows={}))
    monkeypatch.setattr("deploy.driver.Driver", lambda *a, **k: pytest.fail("reached RL"))

    changed = load_run_config(None, [f"train.output_dir={out}", "sft.steps=500", "sft.lr=0.001"])
    with pytest.raises(ValueError, match=r"train.output_dir: .*sft holds an SFT trained with other settings "
                                         r"\(sft.lr: 0.0005 -> 0.001\)"):
        pipeline.run_pipeline(changed, resume=True)
    with pytest.raises(ValueError, match=r"--out: .*sft holds an SFT trained with other settings"):
        run_sft(changed, out_dir=sft_dir, resume=True)
    with pytest.raises(pytest.fail.Exception, match="reached RL"):  # the same settings: the finished SFT is taken
        pipeline.run_pipeline(recorded, resume=True)
    (sft_dir / SFT_SUMMARY_FILE).unlink()  # an SFT cut off before it finished: the main job's resume refuses it too
    with pytest.raises(ValueError, match=r"train.output_dir: .*sft holds an SFT trained with other settings"):
        pipeline.run_pipeline(changed, resume=True)


def test_an_rl_resume_keeps_its_sft_stage_as_it_was_and_is_refused_before_any_stage_runs(tmp_path, monkeypatch):
    """Resumed with an sft section it never had, a run trained SFT for minutes before the RL record refused it;
    resumed with sft.steps raised, SFT ran again and rewrote the model its RL checkpoints had started from."""
    monkeypatch.setattr("models.config.resolve_model_path", lambda *a, **k: MODEL)
    monkeypatch.setattr("deploy.training_data.prepare_training_data",
                        lambda *a, **k: SimpleNamespace(rows={}, bad_rows={}))
    monkeypatch.setattr("deploy.sft.run_sft", lambda *a, **k: pytest.fail("SFT ran"))
    monkeypatch.setattr("deploy.driver.Driver", lambda *a, **k: pytest.fail("reached RL"))

    without = tmp_path / "without"
    without.mkdir()
    (without / "run_config.json").write_text(load_run_config(None, [f"train.output_dir={without}"]).model_dump_json())
    with pytest.raises(ValueError, match="holds an RL run trained without an SFT stage"):
        pipeline.run_pipeline(load_run_config(None, [f"train.output_dir={without}", "sft.steps=30"]), resume=True)

    after = tmp_path / "after"
    sft_dir = after / "sft"
    for name in ("average", "checkpoints/step_30"):
        (sft_dir / name).mkdir(parents=True)
    (sft_dir / SFT_SUMMARY_FILE).write_text(json.dumps({"steps": 30, "checkpoint": str(sft_dir / "checkpoints/step_30"),
                                                        "model": str(sft_dir / "average")}))
    first = load_run_config(None, [f"train.output_dir={after}", "sft.steps=30"])
    (sft_dir / SFT_SETTINGS_FILE).write_text(json.dumps(sft_settings(first, model_path=MODEL)))
    rl = first.model_copy(update={"model": first.model.model_copy(update={"path": str(sft_dir / "average")})})
    (after / "run_config.json").write_text(rl.model_dump_json())  # what the Driver recorded
    with pytest.raises(ValueError, match="sft.steps=60 would train that stage again"):
        pipeline.run_pipeline(load_run_config(None, [f"train.output_dir={after}", "sft.steps=60"]), resume=True)
    with pytest.raises(ValueError, match="holds an RL run trained after an SFT stage"):
        pipeline.run_pipeline(load_run_config(None, [f"train.output_dir={after}"]), resume=True)
    with pytest.raises(pytest.fail.Exception, match="reached RL"):  # as it was: its finished SFT is taken
        pipeline.run_pipeline(first, resume=True)
