"""bench.learning's target check and its reuse of an earlier run, on hand-made summaries (the benchmark itself
runs for hours)."""

from __future__ import annotations

import json

import pytest

from bench.learning import control_start, earlier_control, take_earlier_sft, target_check


def m(miou: float, presence: float, fmt: float = 1.0, rows: int = 250) -> dict:
    return {"miou": miou, "presence_accuracy": presence, "format_validity": fmt, "rows": rows}


def setting(rl_easy: dict, rl_hard: dict) -> dict:
    return {"sft": {"easy": m(0.5, 0.9), "hard": m(0.35, 0.8)},
            "sft_control": {"easy": m(0.5, 0.9), "hard": m(0.36, 0.8)},
            "rl": {"easy": rl_easy, "hard": rl_hard}}


def test_margin_is_over_the_better_of_sft_and_its_control():
    check = target_check(setting(m(0.6, 0.95), m(0.41, 0.92)))
    assert check["best_sft_hard_miou"] == 0.36
    assert check["margin"] == pytest.approx(0.05)
    assert check["met"] and check["met_pooled"]
    assert not target_check(setting(m(0.6, 0.95), m(0.40, 0.92)))["met"]  # margin 0.04


def test_a_hard_split_without_an_animal_leaves_the_bar_unread_instead_of_crashing_after_training():
    unboxed = {"miou": None, "presence_accuracy": 1.0, "format_validity": 1.0, "rows": 250}  # as evaluate reports it
    check = target_check({"sft": {"easy": m(0.5, 0.9), "hard": unboxed},
                          "sft_control": {"easy": m(0.5, 0.9), "hard": unboxed},
                          "rl": {"easy": m(0.6, 0.95), "hard": unboxed}})
    assert check["met"] is None and check["margin"] is None and "no row with an animal" in check["why"]


def test_presence_on_each_split_and_pooled():
    # easy 0.96 (250 rows), hard 0.86 (250 rows): the hard split misses 0.90, both together make 0.91.
    check = target_check(setting(m(0.6, 0.96), m(0.42, 0.86)))
    assert check["presence_accuracy_min"] == 0.86
    assert check["presence_accuracy_pooled"] == pytest.approx(0.91)
    assert not check["met"] and check["met_pooled"]
    # Pooled by rows: 100 easy rows at 0.96 and 300 hard at 0.86 -> (96 + 258) / 400 = 0.885.
    check = target_check(setting(m(0.6, 0.96, rows=100), m(0.42, 0.86, rows=300)))
    assert check["presence_accuracy_pooled"] == pytest.approx(0.885)
    assert not check["met_pooled"]


def test_format_validity_gates_both_readings():
    check = target_check(setting(m(0.6, 0.96), m(0.42, 0.95, fmt=0.97)))
    assert check["format_validity_min"] == 0.97
    assert not check["met"] and not check["met_pooled"]


def test_control_starts_at_sft_without_an_earlier_run():
    assert control_start(None, sft_checkpoint="sft/step_500", rl_seconds=1600.0) == ("sft/step_500", 1600.0, 0.0)


def test_an_earlier_control_is_taken_or_continued_for_what_rl_trained_beyond_it():
    earlier = {"checkpoint": "old/sft_control/step_808", "wall_s": 1595.0, "steps": 808}
    # RL trained 1,550 s: the earlier control already trained longer, taken as it is.
    assert control_start(earlier, sft_checkpoint="sft/step_500", rl_seconds=1550.0) == (
        "old/sft_control/step_808", 0.0, 1595.0)
    # RL trained 1,700 s: continued from its checkpoint for the missing 105 s.
    assert control_start(earlier, sft_checkpoint="sft/step_500", rl_seconds=1700.0) == (
        "old/sft_control/step_808", pytest.approx(105.0), 1595.0)


def test_an_earlier_sft_is_taken_only_with_the_same_step_count(tmp_path):
    earlier = tmp_path / "earlier" / "full"
    (earlier / "sft").mkdir(parents=True)
    (earlier / "sft" / "sft_summary.json").write_text(json.dumps({"steps": 500, "checkpoint": "ckpt/step_500"}))
    out = tmp_path / "new" / "full"
    with pytest.raises(ValueError, match="sft.steps=300"):
        take_earlier_sft(earlier, out, steps=300)
    take_earlier_sft(earlier, out, steps=500)
    taken = json.loads((out / "sft" / "sft_summary.json").read_text())
    assert taken["checkpoint"] == "ckpt/step_500" and taken["reused_from"].endswith("sft_summary.json")


@pytest.mark.parametrize("rl_seconds, continued", [(1500.0, False), (1700.0, True)])
def test_run_setting_reuses_or_continues_the_earlier_control(tmp_path, monkeypatch, rl_seconds, continued):
    # Mocked: the pipeline, SFT and evaluation, which take hours here; what is checked is which checkpoints
    # run_setting trains and evaluates, and the control seconds it reports.
    import bench.learning as bench_learning
    import deploy.pipeline
    import deploy.sft
    from deploy.config import CONFIG_DIR, load_run_config
    from deploy.sft import SFTSummary

    earlier = tmp_path / "earlier" / "full"
    for name, steps, wall in (("sft", 500, 3600.0), ("sft_control", 808, 1595.0)):
        (earlier / name).mkdir(parents=True)
        (earlier / name / "sft_summary.json").write_text(json.dumps(
            {"steps": steps, "checkpoint": f"old/{name}/step_{steps}", "wall_s": wall}))
    out = tmp_path / "new" / "full"
    trained, evaluated = [], []

    def run_pipeline(config, resume):
        taken = json.loads((out / "sft" / "sft_summary.json").read_text())  # what finished_sft reads
        return {"stages": {"rl": {"wall_s": rl_seconds}}, "sft_checkpoint": taken["checkpoint"],
                "sft_model": taken.get("model", taken["checkpoint"]), "eval_json": "rl.json"}

    def run_sft(config, *, out_dir, init_from):
        trained.append((str(init_from), config.sft.max_seconds))
        return SFTSummary(steps=830, checkpoint="new/sft_control/step_830", model="new/sft_control/average",
                          wall_s=110.0, nll=0.3, rows=2000, events_path="", averaged_steps=[825, 830])

    def evaluate_and_report(config, *, model_path, **_):
        evaluated.append(model_path)
        return None, type("Files", (), {"eval_json": f"{model_path}.json"})

    monkeypatch.setattr(deploy.pipeline, "run_pipeline", run_pipeline)
    monkeypatch.setattr(deploy.pipeline, "evaluate_and_report", evaluate_and_report)
    monkeypatch.setattr(deploy.sft, "run_sft", run_sft)
    monkeypatch.setattr(bench_learning, "summarise", lambda path: path)
    monkeypatch.setattr(bench_learning, "baseline", lambda path: None)

    config = load_run_config(CONFIG_DIR / "small-cpu.yaml")
    result = bench_learning.run_setting(config, out=out, earlier=earlier)
    assert evaluated[0] == "old/sft/step_500"
    if continued:  # RL trained 105 s longer than the earlier control: continued from it for those seconds
        assert trained == [("old/sft_control/step_808", pytest.approx(105.0))]
        assert evaluated[1] == "new/sft_control/average"  # the control's model: its own weight average
        assert result["wall_s"]["sft_control"] == pytest.approx(1595.0 + 110.0)
        assert result["wall_s"]["sft_control_steps"] == 830
        # A later --reuse of this run continues its control from all 1,705 s, not the 110 s its run_sft trained.
        assert earlier_control(out) == {"checkpoint": "new/sft_control/step_830", "model": "new/sft_control/average",
                                        "steps": 830, "wall_s": pytest.approx(1705.0)}
    else:
        assert trained == []
        assert evaluated[1] == "old/sft_control/step_808"
        assert result["wall_s"]["sft_control"] == 1595.0 and result["wall_s"]["sft_control_steps"] == 808


def test_a_second_call_on_the_same_out_takes_its_own_control_or_trains_anew_where_it_did_not_finish(
        tmp_path, monkeypatch):
    # Mocked as above: the pipeline, SFT and evaluation.
    import bench.learning as bench_learning
    import deploy.pipeline
    import deploy.sft
    from deploy.config import CONFIG_DIR, load_run_config
    from deploy.sft import SFTSummary

    out = tmp_path / "full"
    trained = []
    monkeypatch.setattr(deploy.pipeline, "run_pipeline", lambda config, resume: {
        "stages": {"rl": {"wall_s": 350.0}}, "sft_checkpoint": "sft/step_500", "sft_model": "sft/average",
        "eval_json": "rl.json"})
    monkeypatch.setattr(deploy.pipeline, "evaluate_and_report", lambda config, *, model_path, **_: (
        None, type("Files", (), {"eval_json": f"{model_path}.json"})))
    monkeypatch.setattr(bench_learning, "summarise", lambda path: path)
    monkeypatch.setattr(bench_learning, "baseline", lambda path: None)

    def run_sft(config, *, out_dir, init_from):
        assert not out_dir.exists() or not list(out_dir.iterdir()), "a new control beside an old one's files"
        trained.append(init_from)
        return SFTSummary(steps=718, checkpoint="ctl/step_718", model="ctl/average", wall_s=351.0, nll=0.3,
                          rows=2000, events_path="", averaged_steps=[718])

    monkeypatch.setattr(deploy.sft, "run_sft", run_sft)
    config = load_run_config(CONFIG_DIR / "small-cpu.yaml")
    # A first call whose control stopped part way: its files are removed, the control trained anew.
    (out / "sft_control" / "checkpoints" / "step_725").mkdir(parents=True)
    first = bench_learning.run_setting(config, out=out)
    assert trained == ["sft/step_500"] and first["wall_s"]["sft_control"] == 351.0
    # A second call: the control this --out finished covers RL's 350 s, so it is taken, not trained again.
    second = bench_learning.run_setting(config, out=out)
    assert trained == ["sft/step_500"] and second["wall_s"]["sft_control"] == 351.0
    assert second["wall_s"]["sft_control_steps"] == 718


def test_a_reused_run_without_a_control_summary_is_refused(tmp_path):
    # Runs from before control_summary.json: a control that continued a reused one has a summary counting only
    # its continuation, so its wall time is unknown.
    earlier = tmp_path / "earlier" / "full"
    for name, fields in (("sft", {"reused_from": "older/full/sft/sft_summary.json"}), ("sft_control", {})):
        (earlier / name).mkdir(parents=True)
        (earlier / name / "sft_summary.json").write_text(json.dumps(
            {"steps": 500, "checkpoint": f"{name}/step_500", "wall_s": 45.0, **fields}))
    with pytest.raises(ValueError, match="only its own continuation"):
        earlier_control(earlier)


def test_reuse_of_a_run_whose_control_did_not_finish_fails_before_anything_runs(tmp_path):
    from bench.learning import run_setting
    from deploy.config import CONFIG_DIR, load_run_config

    earlier = tmp_path / "earlier" / "full"
    (earlier / "sft").mkdir(parents=True)
    (earlier / "sft" / "sft_summary.json").write_text(json.dumps({"steps": 500, "checkpoint": "ckpt/step_500"}))
    with pytest.raises(ValueError, match="sft_control.*did not finish"):
        run_setting(load_run_config(CONFIG_DIR / "small-cpu.yaml"), out=tmp_path / "new", earlier=earlier)
    assert not (tmp_path / "new").exists()  # nothing written, nothing started


def test_the_result_names_the_config_each_setting_ran(tmp_path, monkeypatch, capsys):
    # Mocked: the settings themselves (hours of training); what is checked is what main() writes about them.
    # With a few-shot config and --skip-fewshot the only setting is still called "full": the result must say
    # which config that was.
    import bench.learning as bench_learning
    import models.config
    from deploy.config import CONFIG_DIR

    ran = []

    def run_setting(config, *, out, earlier=None):
        ran.append((out.name, config.data.train_limit))
        return {**setting(m(0.6, 0.95), m(0.41, 0.92)), "baseline": {}, "wall_s": {}}

    monkeypatch.setattr(bench_learning, "run_setting", run_setting)
    monkeypatch.setattr(models.config, "resolve_model_path", lambda model: "unused")
    fewshot = str(CONFIG_DIR / "fewshot-cpu.yaml")
    assert bench_learning.main(["--out", str(tmp_path), "--config", fewshot, "--skip-fewshot",
                                "--set", "train.eval_limit=7"]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert ran == [("full", 500)]  # the few-shot config's 500 images, under the name "full"
    assert result["settings"] == {"full": {"config": fewshot, "overrides": ["train.eval_limit=7"]}}
    assert json.loads(capsys.readouterr().out)["settings"] == result["settings"]
