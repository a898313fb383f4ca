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
