"""The command line: its progress bar (a total that is an estimate, SFT bounded by max_seconds, may move) and
the checks `refocus eval` makes before it evaluates."""

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
