"""The main job at a tiny scale, through the real CLI: model → data → SFT → RL → evaluation → report.

``refocus train`` runs in a subprocess on the tiny model (built by the session fixture) with a few
SFT and RL steps; the test checks that every stage ran in order and handed its product to the next
(RL starts from SFT's checkpoint) and that the report was written with its pictures.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.config import shipped_configs

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")
SFT_STEPS, RL_STEPS, EVAL_ROWS = 3, 2, 4


# Chain-of-Focus: SFT on zoom traces, RL and evaluation rolling out two turns.
ZOOM = ["rollout.env.max_turns=2", "rollout.prompt.allow_zoom=true", "sft.zoom_context=1.5"]


@pytest.mark.parametrize("zoom", [False, True], ids=["one-turn", "zoom"])
def test_train_runs_sft_then_rl_then_evaluation_and_writes_the_report(tiny_model_dir, tmp_path, zoom):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "deploy.cli", "train", str(TINY_CPU),
        "--set", f"model.path={tiny_model_dir}", "--set", f"data.path={tmp_path / 'data'}", "--set", "data.synth_n=60",
        "--set", f"train.output_dir={run}", "--set", f"train.steps={RL_STEPS}", "--set", "train.checkpoint_every=0",
        "--set", f"train.eval_limit={EVAL_ROWS}", "--set", "train.eval_modes=[greedy]",
        "--set", f"sft.steps={SFT_STEPS}", "--set", "sft.batch_samples=8", "--set", "sft.micro_batch_samples=4",
        "--set", "sft.warmup_steps=1", "--set", "sft.log_every=1", "--set", "sft.checkpoint_every=2",
    ]
    # One turn also ends SFT with a weight average: snapshots at step 2 and at the last step (3).
    for override in ZOOM if zoom else ["sft.average_last=2", "sft.average_every=2"]:
        command += ["--set", override]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert list(summary["stages"]) == ["model", "data", "sft", "rl", "eval"]
    assert summary["stages"]["data"]["rows"] == 48  # 80 % of 60 synthetic images

    # SFT: every step logged, the loss fell, and its model (checkpoint or average) is the one RL started from.
    sft_events = [json.loads(line) for line in (run / "sft" / "sft_events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in sft_events] == list(range(1, SFT_STEPS + 1))
    assert all(math.isfinite(e["loss/sft_nll"]) for e in sft_events)  # zoom turns' image pads once made NaN
    assert sft_events[-1]["loss/sft_nll"] < sft_events[0]["loss/sft_nll"]
    sft_checkpoint = Path(summary["sft_checkpoint"])
    assert sft_checkpoint == run / "sft" / "checkpoints" / f"step_{SFT_STEPS}"
    assert (sft_checkpoint / "config.json").is_file() and (sft_checkpoint / "model.safetensors").is_file()
    sft_model = Path(summary["sft_model"])
    if zoom:
        assert sft_model == sft_checkpoint
    else:
        assert sft_model == run / "sft" / "average"
        averaged = json.loads((sft_model / "averaged_from.json").read_text())
        assert [Path(d).name for d in averaged] == ["step_2", "step_3"]
        assert sorted(p.name for p in (run / "sft" / "snapshots").iterdir()) == ["step_2", "step_3"]
        assert (sft_model / "model.safetensors").is_file() and (sft_model / "tokenizer.json").is_file()
        assert not (sft_model / "state").exists()  # a model directory, not a resumable checkpoint
    assert str(sft_model) in done.stderr  # the RL driver logged the model it loaded
    # sft.checkpoint_every=2 of 3 steps: one checkpoint on the way, one at the end (not written twice).
    assert sorted(p.name for p in (run / "sft" / "checkpoints").iterdir()) == ["step_2", "step_3"]

    # RL: its steps ran and its last checkpoint was evaluated.
    rl_events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in rl_events] == list(range(1, RL_STEPS + 1))
    assert all(math.isfinite(e["learner"]["loss/total"]) for e in rl_events)
    assert summary["rl_checkpoint"].endswith(f"step_{RL_STEPS}")

    result = json.loads(Path(summary["eval_json"]).read_text())
    assert result["model_path"] == summary["rl_checkpoint"]
    for split in ("test_easy", "test_hard"):
        greedy = result["splits"][split]["modes"]["greedy"]["all"]
        assert greedy["rows"] == EVAL_ROWS and 0.0 <= greedy["miou"] <= 1.0
    report = Path(summary["report"]).read_text()
    pictures = [line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines() if line.startswith("![")]
    assert any("curve" in p for p in pictures) and any("example" in p for p in pictures), pictures
    for picture in pictures:
        assert (Path(summary["report"]).parent / picture).stat().st_size > 1000
    assert "| test_hard | greedy |" in done.stdout  # the metrics table
