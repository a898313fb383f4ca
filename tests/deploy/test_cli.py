"""The command line's progress bar: a total that is an estimate (SFT bounded by max_seconds) may move."""

from deploy.cli import _progress_bar


def test_the_progress_bar_follows_a_moving_total_and_ends_at_the_last_one(capsys):
    progress = _progress_bar("sft", unit="step")
    progress(1, 50_000)  # before a pace is known: sft.steps
    progress(2, 720)
    progress(3, 716)
    progress(717, 717)  # the run stops on max_seconds: the bar ends where it did
    last = capsys.readouterr().err.strip().split("\r")[-1]  # tqdm redraws its line after a carriage return
    assert "100%" in last and "717/717" in last
