"""bench.checkpoint_curve on hand-made run directories (the runs it reads take an hour and more): which checkpoints
form each series at which wall time, which evaluations are reused, and the late means compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.checkpoint_curve import (checkpoint_series, known_evals, late_margin, late_summary, plot_curve,
                                    step_walls)


def write_events(path: Path, walls: dict[int, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "wall_s": w, "loss": 0.1}) + "\n" for s, w in walls.items()))


def checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    path = root / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "COMPLETE").write_text("")
    return path


def summary(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))


def test_step_walls_adds_the_offset_and_a_resumed_step_keeps_its_last_time(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"step": 1, "wall_s": 4.0}\n{"step": 2, "wall_s": 9.0}\n\n{"step": 2, "wall_s": 11.5}\n')
    assert step_walls(events, offset=100.0) == {1: 104.0, 2: 111.5}


def test_step_walls_place_a_continuation_whose_clock_restarts_after_the_run_it_continues(tmp_path):
    """The bench continuing its own control (`run_sft --init-from` its checkpoint at step 2, into the same
    directory) logs steps 3 and 4 at 0.5 and 1.5 s of its own clock: they come after step 2's 9 s, not before."""
    events = tmp_path / "sft_events.jsonl"
    events.write_text("".join(json.dumps({"step": s, "wall_s": w}) + "\n"
                              for s, w in ((1, 4.0), (2, 9.0), (3, 0.5), (4, 1.5), (5, 0.25))))
    # step 5 at 0.25 s: a second continuation, from step 4
    assert step_walls(events, offset=100.0) == {1: 104.0, 2: 109.0, 3: 109.5, 4: 110.5, 5: 110.75}


def test_step_walls_skips_a_line_a_killed_run_cut(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"step": 1, "wall_s": 4.0}\n{"step": 2, "wa\n{"step": 3, "wall_s": 12.0}\n["a list"]\n')
    assert step_walls(events) == {1: 4.0, 3: 12.0}


def test_series_of_a_run_that_trained_its_own_sft_and_control(tmp_path):
    setting = tmp_path / "full"
    sft = checkpoint(setting / "sft", 500)
    summary(setting / "sft" / "sft_summary.json", steps=500, checkpoint=str(sft), wall_s=3000.0)
    control = setting / "sft_control"
    for step in (525, 550):
        checkpoint(control, step)
    checkpoint(control, 575, complete=False)  # a crash mid-write: not a checkpoint
    write_events(control / "sft_events.jsonl", {501: 4.0, 525: 100.0, 550: 200.0, 575: 300.0})
    for step in (25, 50):
        checkpoint(setting, step)
    write_events(setting / "events.jsonl", {25: 390.0, 50: 780.0})

    series = checkpoint_series(setting)
    assert series["sft"] == [{"step": 500, "wall_s": 0.0, "checkpoint": str(sft)}]
    assert [(p["step"], p["wall_s"]) for p in series["sft_control"]] == [(525, 100.0), (550, 200.0)]
    assert [(p["step"], p["wall_s"]) for p in series["rl"]] == [(25, 390.0), (50, 780.0)]

    # An SFT that ended with a weight average: that model is its point (RL started from it), not the checkpoint.
    average = setting / "sft" / "average"
    summary(setting / "sft" / "sft_summary.json", steps=500, checkpoint=str(sft), model=str(average), wall_s=3000.0)
    assert checkpoint_series(setting)["sft"] == [{"step": 500, "wall_s": 0.0, "checkpoint": str(average)}]


def test_a_reused_control_is_the_first_point_and_this_runs_continuation_adds_its_wall_time(tmp_path):
    earlier = tmp_path / "earlier" / "full"
    summary(earlier / "sft" / "sft_summary.json", steps=500, checkpoint="earlier/sft/step_500", wall_s=3000.0)
    summary(earlier / "sft_control" / "sft_summary.json", steps=808, checkpoint="earlier/ctl/step_808", wall_s=1595.0)
    setting = tmp_path / "now" / "full"
    summary(setting / "sft" / "sft_summary.json", steps=500, checkpoint="earlier/sft/step_500", wall_s=3000.0,
            reused_from=str(earlier / "sft" / "sft_summary.json"))
    checkpoint(setting / "sft_control", 825)
    write_events(setting / "sft_control" / "sft_events.jsonl", {825: 70.0})
    write_events(setting / "events.jsonl", {})

    controls = checkpoint_series(setting)["sft_control"]
    assert [(p["step"], p["wall_s"]) for p in controls] == [(808, 1595.0), (825, 1665.0)]
    assert controls[0]["checkpoint"] == "earlier/ctl/step_808"



def test_a_run_directory_that_is_no_bench_setting_is_one_series_at_its_own_events_wall_times(tmp_path):
    rl = tmp_path / "rl-run"  # refocus train without SFT: events.jsonl
    checkpoint(rl, 25)
    write_events(rl / "events.jsonl", {25: 300.0})
    sft = tmp_path / "sft-run"  # refocus sft --out: sft_events.jsonl
    checkpoint(sft, 450)
    checkpoint(sft, 475)
    write_events(sft / "sft_events.jsonl", {450: 900.0, 475: 950.0})
    assert [(p["step"], p["wall_s"]) for p in checkpoint_series(rl)["run"]] == [(25, 300.0)]
    assert list(checkpoint_series(sft)) == ["run"]
    assert [(p["step"], p["wall_s"]) for p in checkpoint_series(sft)["run"]] == [(450, 900.0), (475, 950.0)]


def test_known_evals_are_keyed_by_model_path_and_only_on_the_same_rows(tmp_path):
    data = tmp_path / "data"
    settings = {"prompt": {"frame": "input"}}
    for name, limit in (("a", 250), ("b", 100)):
        summary(tmp_path / name / "eval.json", model_path=str(tmp_path / f"ckpt_{name}"), limit=limit,
                data_dir=str(data), settings=settings)
    found = known_evals([tmp_path], limit=250, data_dir=str(data), settings=settings)
    assert found == {str((tmp_path / "ckpt_a").resolve()): tmp_path / "a" / "eval.json"}
    # made under other settings (a first call without the zoom config), or before settings were recorded: not reused
    assert known_evals([tmp_path], limit=250, data_dir=str(data), settings={"prompt": {"frame": "norm1000"}}) == {}
    summary(tmp_path / "a" / "eval.json", model_path=str(tmp_path / "ckpt_a"), limit=250, data_dir=str(data))
    assert known_evals([tmp_path], limit=250, data_dir=str(data), settings=settings) == {}


def test_evaluation_settings_tell_apart_what_changes_the_figures():
    from deploy.config import CONFIG_DIR, load_run_config
    from deploy.evaluate import evaluation_settings

    main = load_run_config(CONFIG_DIR / "small-cpu.yaml")
    base = evaluation_settings(main, ["greedy"])
    assert evaluation_settings(load_run_config(CONFIG_DIR / "small-cpu.yaml", ["sft.steps=900"]), ["greedy"]) == base
    for overrides in (["rollout.prompt.system=brief"], ["rewards.think_rule=free"]):
        assert evaluation_settings(load_run_config(CONFIG_DIR / "small-cpu.yaml", overrides), ["greedy"]) != base
    assert evaluation_settings(load_run_config(CONFIG_DIR / "zoom-cpu.yaml"), ["greedy"]) != base
    assert evaluation_settings(main, ["greedy", "sampled"]) != base


def point(step: int, wall: float, hard_miou: float, found: float = 0.9, easy_miou: float = 0.6) -> dict:
    hard = {"miou": hard_miou, "found_rate": found, "miou_found": hard_miou / found, "presence_accuracy": 0.88}
    return {"step": step, "wall_s": wall, "easy": {"miou": easy_miou}, "hard": hard}


def test_late_summary_takes_the_last_points_by_wall_time():
    points = [point(75, 300.0, 0.44), point(25, 100.0, 0.30), point(100, 400.0, 0.46), point(50, 200.0, 0.42)]
    late = late_summary(points, last=3)
    assert late["steps"] == [50, 75, 100]
    assert late["hard_miou"] == {"mean": pytest.approx(0.44), "min": 0.42, "max": 0.46}  # (0.42 + 0.44 + 0.46) / 3
    assert late["easy_miou_mean"] == pytest.approx(0.6)
    assert late_summary(points, last=10)["points"] == 4


def test_late_summary_leaves_out_a_checkpoint_without_a_figure_and_counts_it():
    # A checkpoint that boxed no hard animal has no mIoU over found animals (eval.json: null).
    points = [point(25, 100.0, 0.40), point(50, 200.0, 0.0, found=1.0), point(75, 300.0, 0.44)]
    points[1]["hard"]["miou_found"] = None
    late = late_summary(points, last=3)
    assert late["hard_miou_found"] == {"mean": 0.4667, "min": 0.40 / 0.9,  # (0.444 + 0.489) / 2, rounded
                                       "max": 0.44 / 0.9, "missing": 1}
    assert "missing" not in late["hard_miou"]
    points[0]["hard"]["miou_found"] = points[2]["hard"]["miou_found"] = None
    assert late_summary(points, last=3)["hard_miou_found"] == {"mean": None, "min": None, "max": None, "missing": 3}


def test_late_margin_is_over_the_better_of_sft_and_the_control():
    hard_miou = {"sft": 0.42, "sft_control": 0.415, "rl": 0.47}
    assert late_margin(hard_miou) == pytest.approx(0.05)
    assert late_margin({**hard_miou, "sft_control": 0.43}) == pytest.approx(0.04)
    del hard_miou["sft_control"]
    assert late_margin(hard_miou) == pytest.approx(0.05)


def test_plot_curve_writes_a_png(tmp_path):
    points = {"sft": [point(500, 0.0, 0.42)], "sft_control": [point(525, 100.0, 0.40), point(550, 200.0, 0.43)],
              "rl": [point(25, 90.0, 0.44), point(50, 190.0, 0.45)]}
    late = {name: late_summary(ps, last=2) for name, ps in points.items()}
    plot_curve(points, late, out_path=tmp_path / "curve.png", averaged={"rl": point(50, 190.0, 0.46)})
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_control_of_one_checkpoint_is_its_own_average_in_the_averaged_margin(tmp_path, monkeypatch):
    """A control taken as it was (`bench.learning --reuse`) has one checkpoint: it was left out of `averaged`, so
    `margin_averaged` compared RL with SFT alone (+0.07 here) while `margin_late` counted the control (-0.03).
    Evaluation, averaging and plotting are stubbed (each evaluation would start a vLLM engine on a trained model);
    the series, late windows and margins are the script's own."""
    from types import SimpleNamespace

    import bench.checkpoint_curve as curve
    import deploy.pipeline
    from bench.learning import FIELDS
    from deploy.evaluate import ALL_TASKS, GREEDY

    def point(name: str, step: int, wall: float) -> dict:
        return {"step": step, "wall_s": wall, "checkpoint": str(tmp_path / name / "checkpoints" / f"step_{step}")}

    series = {"sft": [point("sft", 100, 0.0)], "sft_control": [point("control", 300, 900.0)],
              "rl": [point("rl1", 10, 300.0), point("rl2", 20, 600.0), point("rl3", 30, 900.0)]}
    hard = {"sft": 0.30, "control": 0.40, "rl1": 0.36, "rl2": 0.38, "rl3": 0.37}  # RL's average: 0.37

    def evaluate(config, *, model_path, out, **kwargs):
        miou = hard.get(Path(model_path).parts[-3], 0.37)
        values = {"format_validity": 1.0, "presence_accuracy": 1.0, "category_accuracy": 0.0, "miou": miou,
                  "found_rate": 1.0, "miou_found": miou, "presence_auc": 1.0, "ap50": 0.0, "distinct_answers": 1,
                  "rows": 10}
        table = {key: values[field] for key, field in FIELDS.items()}
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(
            {"splits": {split: {"modes": {GREEDY: {ALL_TASKS: table}}} for split in ("test_easy", "test_hard")}}))
        return None, SimpleNamespace(eval_json=out / "eval.json")

    def average(checkpoints, model):
        Path(model).mkdir(parents=True, exist_ok=True)
        (Path(model) / curve.AVERAGED_FROM_FILE).write_text("[]")

    monkeypatch.setattr(curve, "checkpoint_series", lambda setting: series)
    monkeypatch.setattr(curve, "known_evals", lambda roots, **kwargs: {})
    monkeypatch.setattr(curve, "plot_curve", lambda *args, **kwargs: None)
    monkeypatch.setattr(curve, "average_checkpoints", average)
    monkeypatch.setattr(deploy.pipeline, "evaluate_and_report", evaluate)
    assert curve.main([str(tmp_path / "setting"), "--last", "3", "--average", "--out", str(tmp_path / "curve")]) == 0
    result = json.loads((tmp_path / "curve" / curve.CURVE_FILE).read_text())
    assert set(result["averaged"]) == {"sft", "sft_control", "rl"}
    assert result["margin_late"] == pytest.approx(-0.03) and result["margin_averaged"] == pytest.approx(-0.03)
