"""The command line: its progress bar (a total that is an estimate, SFT bounded by max_seconds, may move) and
the checks `refocus eval` makes before it evaluates."""

import pytest

from deploy.cli import _progress_bar


def test_the_progress_bar_follows_a_moving_total_and_ends_at_the_last_one(capsys):
    progress = _progress_bar("sft", unit="step")
    progress(1, 50_000)  # before a pace is known: sft.steps
    progress(2, 720)
    progress(3, 716)
    progress(717, 717)  # the run stops on max_seconds: the bar ends where it did
    last = capsys.readouterr().err.strip().split("\r")[-1]  # tqdm redraws its line after a carriage return
    assert "100%" in last and "717/717" in last


def test_eval_refuses_a_run_dir_without_step_events_before_it_evaluates(tmp_path, capsys):
    from deploy.cli import main

    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "sft_events.jsonl").write_text("{}\n")  # an SFT directory: no RL step events
    out = tmp_path / "eval"
    # The checkpoint does not exist either: the run dir is checked first, before anything is built or loaded.
    code = main(["eval", str(tmp_path / "no-model"), "--data", str(tmp_path), "--run-dir", str(sft_dir),
                 "--out", str(out)])
    assert code == 2 and "--run-dir: no events.jsonl" in capsys.readouterr().err
    assert not out.exists()


def test_model_build_refuses_a_directory_it_did_not_build_before_building(tmp_path, capsys):
    """A build replaces its --out whole: pointed at the user's directory (or the builtin cache's parent) it
    deleted what was there and exited 0. It refuses, with exit 2, before any work."""
    from deploy.cli import main

    (tmp_path / "notes.txt").write_text("keep me")
    code = main(["model", "build", "--size", "tiny", "--out", str(tmp_path)])
    assert code == 2 and "is not a model built here" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path.parent / f"{tmp_path.name}.building").exists()  # refused before the build began

    # A checkpoint written from a built model carried its build record (before models.records kept it out): a
    # build into it would have deleted its weights and optimiser state. Refused, whatever record it holds.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_100"
    (checkpoint / "state").mkdir(parents=True)
    for name in ("refocus_build.json", "COMPLETE", "trainer_state.json", "model.safetensors"):
        (checkpoint / name).write_text("{}")
    code = main(["model", "build", "--size", "tiny", "--out", str(checkpoint)])
    assert code == 2 and "is a trained model or checkpoint (it holds COMPLETE)" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoint.iterdir()) == ["COMPLETE", "model.safetensors", "refocus_build.json",
                                                            "state", "trainer_state.json"]


def test_a_file_in_the_way_is_a_user_error_not_a_traceback(tmp_path, capsys):
    from deploy.cli import main

    (tmp_path / "synth").write_text("a file, not a directory")
    code = main(["data", "synth", "--out", str(tmp_path / "synth"), "--n", "10"])
    assert code == 2 and "error:" in capsys.readouterr().err


def test_rewards_score_reads_a_rows_stage_as_the_run_numbers_it(tmp_path, capsys):
    """The run records stages from 0 (events.jsonl, spilled groups, curriculum.stages.N); a dumped row of the
    IoU stage (2) was scored with the category stage's weights, and a row of stage 0 was an error."""
    import json

    from deploy.cli import main
    from deploy.config import load_run_config, shipped_configs

    completion = ('<think>present moth</think><answer>{"present": true, "category": "moth", '
                  '"boxes": [[10, 10, 50, 50]]}</answer>')
    target = {"boxes": [[10, 10, 40, 40]], "category": "moth", "present": True, "width": 100, "height": 100}
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"completion": completion, "target": target, "frame": "original",
                                        "stage": stage}) + "\n" for stage in (0, 2)))
    small = next(p for p in shipped_configs() if p.name == "small-cpu.yaml")
    assert main(["rewards", "score", str(rows), "--config", str(small)]) == 0
    first, iou_stage = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    stages = load_run_config(small).curriculum.stages
    for scored, stage in ((first, stages[0]), (iou_stage, stages[2])):
        assert "error" not in scored
        expected = sum(weight * scored[name] for name, weight in stage.reward_weights.items())
        assert scored["total"] == pytest.approx(expected)
    assert iou_stage["iou"] == pytest.approx(900 / 1600)  # the IoU stage pays the box
