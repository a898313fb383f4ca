"""The main job (``refocus train``): model → data → SFT → RL with the curriculum → evaluation and report.

Each stage reuses what an earlier run already made: the builtin model and the synthetic data are
built once (``models.config.resolve_model_path``, ``deploy.training_data.prepare_training_data``), a
finished SFT (its summary names its checkpoint and model) is not run again, and ``resume`` continues an
interrupted SFT or RL from its last complete checkpoint. RL starts from SFT's model (its last checkpoint, or
with ``sft.average_last`` the weight average of its last snapshots), a plain model directory, so the RL driver
treats it like any ``model.path``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SFT_DIR = "sft"
EVAL_DIR = "eval"
PIPELINE_SUMMARY_FILE = "pipeline_summary.json"


def finished_sft(out_dir: Path, *, steps: int) -> tuple[str, str] | None:
    """(last checkpoint, model) of an SFT under ``out_dir`` that already ran all ``steps``, else None (summaries
    from before ``model`` existed name the checkpoint, which was the model)."""
    from deploy.sft import SFT_SUMMARY_FILE

    summary_file = out_dir / SFT_SUMMARY_FILE
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    checkpoint = summary.get("checkpoint", "")
    model = summary.get("model", checkpoint)
    if summary.get("steps") == steps and Path(checkpoint).is_dir() and Path(model).is_dir():
        return checkpoint, model
    return None


def _refuse_another_sft_stage(out: Path, config, *, finished) -> None:
    """A resumed RL run continues from the model its SFT stage made: refuse, before any stage runs, a resume that
    adds or removes that stage, or that would train it again to other ``sft.steps``, rewriting the model the RL
    checkpoints started from (and with ``kl_coef`` its reference). Its other settings are checked by the SFT
    stage's own record. Nothing to check before RL has started."""
    from deploy.driver import OUTPUT_DIR_SETTING
    from deploy.run_record import RUN_CONFIG_FILE

    recorded_file = out / RUN_CONFIG_FILE
    if not recorded_file.is_file():
        return
    recorded_sft = json.loads(recorded_file.read_text()).get("sft")
    if (recorded_sft is None) != (config.sft is None):
        had = "after an SFT stage" if recorded_sft is not None else "without an SFT stage"
        raise ValueError(f"{OUTPUT_DIR_SETTING}: {out} holds an RL run trained {had}; a --resume keeps it so "
                         f"(sft: {'as it was' if recorded_sft is not None else 'null'})")
    if config.sft is not None and finished is None and recorded_sft.get("steps") != config.sft.steps:
        raise ValueError(f"{OUTPUT_DIR_SETTING}: the RL run in {out} started from the model of its SFT stage "
                         f"({recorded_sft.get('steps')} steps); sft.steps={config.sft.steps} would train that stage "
                         "again under the RL checkpoints: keep sft.steps")


def run_pipeline(config, *, resume: bool = False,
                 progress: Callable[[str], Callable[[int, int], None]] | None = None) -> dict:
    """Run every stage of ``config`` (a ``RunConfig``); returns what each produced (also written to
    ``<train.output_dir>/pipeline_summary.json``). ``progress(stage)`` gives a ``(done, total)`` callback."""
    from deploy.driver import OUTPUT_DIR_SETTING, Driver
    from deploy.run_record import check_rl_resume, refuse_buffered_run
    from deploy.sft import check_same_settings, run_sft, sft_settings
    from deploy.training_data import prepare_training_data
    from learner.checkpoint import refuse_earlier_run
    from models.config import resolve_model_path

    out = Path(config.train.output_dir)
    sft_out = out / SFT_DIR
    finished = None if config.sft is None else finished_sft(sft_out, steps=config.sft.steps)
    if not resume:  # before SFT and model building, not after them; a finished SFT is reused, not refused
        refuse_earlier_run(out, setting=OUTPUT_DIR_SETTING)
        refuse_buffered_run(out, setting=OUTPUT_DIR_SETTING)
        if config.sft is not None and finished is None:
            refuse_earlier_run(sft_out, setting=OUTPUT_DIR_SETTING)
    else:  # an RL run this resume would refuse is refused before SFT runs, not after
        _refuse_another_sft_stage(out, config, finished=finished)
        check_rl_resume(out, config.model_dump(mode="json"), setting=OUTPUT_DIR_SETTING,
                        model_from_sft=config.sft is not None)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict = {"stages": {}}

    def timed(name: str, began: float, wall_s: float | None = None, **fields) -> None:
        wall_s = time.perf_counter() - began if wall_s is None else wall_s
        summary["stages"][name] = {"wall_s": round(wall_s, 1), **fields}
        log.info("pipeline: %s done in %.0f s", name, summary["stages"][name]["wall_s"])

    began = time.perf_counter()
    model_path = str(resolve_model_path(config.model))
    timed("model", began, path=model_path)
    began = time.perf_counter()
    data = prepare_training_data(config.data)
    timed("data", began, rows=len(data.rows), bad_rows=dict(data.bad_rows))

    rl_config = config
    if config.sft is not None:
        began = time.perf_counter()
        if finished is None:  # (a resume checks the SFT's recorded settings)
            result = run_sft(config, out_dir=sft_out, resume=resume, out_setting=OUTPUT_DIR_SETTING,
                             progress=progress("sft") if progress else None)
            checkpoint, model = result.checkpoint, result.model
        else:  # a finished SFT must be this config's too (bench.learning --reuse copies a summary alone: not checked)
            check_same_settings(sft_out, sft_settings(config, model_path=model_path), setting=OUTPUT_DIR_SETTING)
            checkpoint, model = finished
            log.info("pipeline: SFT already finished (%s)", model)
        timed("sft", began, checkpoint=checkpoint, model=model)
        # RL starts from SFT's model: one model per run, that model.
        rl_config = config.model_copy(update={"model": config.model.model_copy(update={"path": model})})
        summary["sft_checkpoint"], summary["sft_model"] = checkpoint, model

    began = time.perf_counter()
    driver = Driver(rl_config, resume=resume)
    try:
        rl = driver.run()
    finally:
        driver.shutdown()
    # The driver's seconds count the whole RL run, those before a resume too (what the SFT control matches).
    timed("rl", began, wall_s=rl.wall_s, checkpoint=rl.checkpoint, steps=rl.steps, stage=rl.stage)
    summary["rl_checkpoint"] = rl.checkpoint

    if config.train.eval_at_end:
        began = time.perf_counter()
        _, files = evaluate_and_report(rl_config, model_path=rl.checkpoint, data=config.data.path, splits=None,
                                    limit=config.train.eval_limit, out=out / EVAL_DIR, run_dir=out,
                                    progress=progress("eval") if progress else None)
        timed("eval", began, eval_json=str(files.eval_json), report=str(files.report_md))
        summary["eval_json"], summary["report"] = str(files.eval_json), str(files.report_md)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    (out / PIPELINE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_and_report(config, *, model_path, data, splits, limit, out, run_dir, progress=None):
    """Evaluate ``model_path`` on ``splits`` of ``data`` and write eval.json + report.md; returns
    (``EvalResult``, ``ReportFiles``)."""
    from deploy.evaluate import evaluate
    from deploy.report import write_report

    result = evaluate(model_path=model_path, data_dir=data, splits=splits or config.data.eval_splits,
                      config=config, limit=limit, progress=progress, modes=config.train.eval_modes)
    files = write_report(result=result, out_dir=out, run_dir=run_dir,
                         stage_names=[stage.name for stage in config.curriculum.stages])
    return result, files
