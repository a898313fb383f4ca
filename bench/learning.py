"""Does RL beat SFT? The main job on the embedded default, against SFT and an SFT control, full and few-shot.

For each setting (full: ``deploy/configs/small-cpu.yaml``; few-shot: ``deploy/configs/fewshot-cpu.yaml``,
the same with 500 labelled training images for SFT and RL alike):

    main job    ``deploy.pipeline.run_pipeline``: SFT, then RL with the curriculum, then evaluation
    sft         the SFT model RL started from, evaluated the same way
    sft_control SFT continued from SFT's last checkpoint for as long as RL trained (wall time), so RL is not
                credited for mere extra training; with ``sft.average_last`` both are weight averages of their
                own last snapshots (``deploy.sft``)

Every model is evaluated greedily on the held-out test_easy and test_hard splits (``train.eval_limit``
rows each). Prints ONE JSON object (also written to ``<out>/result.json``)::

    {"sft": {"easy": M, "hard": M}, "sft_control": {...}, "rl": {...},
     "fewshot": {"sft": ..., "sft_control": ..., "rl": ...}, "baseline": {...}, "wall_s": ..., "target": {...},
     "settings": {"full": {"config": PATH, "overrides": [...]}, "fewshot": {...}}}

M holds format_validity, presence_accuracy, category_accuracy, miou (and found_rate, miou_found, presence_auc, ap50,
distinct_answers, rows).
``target`` checks the issue's bar: RL's hard mIoU >= max(sft, sft_control) + 0.05 in either setting, with
format validity >= 0.98 and presence accuracy >= 0.90 on each split (``met``; ``met_pooled``: over both
splits together). The model build (warm start included) happens
once and is timed separately (``model_build_s``).

``--reuse DIR`` measures an RL variant against the SFT and control of an earlier run of this benchmark (its
``--out``; same SFT settings and data, of which only the step count is checked): the pipeline takes that SFT
instead of training one, and the control is taken as it is when it trained at least as long as this run's RL,
else continued from its checkpoint for the difference. An RL variant then costs its RL and three evaluations
(~30 min for zoom) instead of ~2 h.

One checkpoint is a noisy point (SFT checkpoints 25 steps apart differ by up to 0.04 hard mIoU): with ``--set
train.checkpoint_every=N --set sft.checkpoint_every=N`` RL and the control checkpoint on the way, and
``python -m bench.checkpoint_curve <out>/full`` compares them over their last checkpoints and weight averages.

    python -m bench.learning [--out runs/bench-learning] [--skip-fewshot] [--set KEY=VALUE ...] [--reuse DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: do not let bench/ shadow the top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from deploy.config import CONFIG_DIR, load_run_config  # noqa: E402
from deploy.evaluate import (ALL_TASKS, B_FIXED_BOX_MIOU, GREEDY, M_AP50, M_CATEGORY, M_DISTINCT,  # noqa: E402
                             M_FORMAT, M_FOUND, M_MIOU, M_MIOU_FOUND, M_PRESENCE, M_PRESENCE_AUC, M_ROWS)
from deploy.pipeline import SFT_DIR  # noqa: E402
from deploy.sft import SFT_SUMMARY_FILE  # noqa: E402

log = logging.getLogger("bench.learning")

MIOU_MARGIN = 0.05
MIN_FORMAT = 0.98
MIN_PRESENCE = 0.90
SPLITS = {"easy": "test_easy", "hard": "test_hard"}
RESULT_FILE = "result.json"
CONTROL_DIR = "sft_control"
# The control as a whole: {"checkpoint", "model", "steps", "wall_s"}, wall_s counting an earlier run's control it
# continued (its sft_summary.json counts only what that run_sft trained).
CONTROL_SUMMARY_FILE = "control_summary.json"
# eval.json key → the benchmark's name for it.
FIELDS = {M_FORMAT: "format_validity", M_PRESENCE: "presence_accuracy", M_PRESENCE_AUC: "presence_auc",
          M_CATEGORY: "category_accuracy",
          M_MIOU: "miou", M_FOUND: "found_rate", M_MIOU_FOUND: "miou_found", M_AP50: "ap50",
          M_DISTINCT: "distinct_answers", M_ROWS: "rows"}


def summarise(eval_json: str | Path) -> dict:
    """{"easy": M, "hard": M} from an eval.json (greedy mode, all tasks)."""
    result = json.loads(Path(eval_json).read_text())
    out = {}
    for name, split in SPLITS.items():
        table = result["splits"][split]["modes"][GREEDY][ALL_TASKS]
        out[name] = {FIELDS[key]: table.get(key) for key in FIELDS}
    return out


def baseline(eval_json: str | Path) -> dict:
    result = json.loads(Path(eval_json).read_text())
    return {name: {"fixed_box_miou": result["splits"][split]["baseline"][ALL_TASKS][B_FIXED_BOX_MIOU]}
            for name, split in SPLITS.items()}


def take_earlier_sft(earlier: Path, out: Path, *, steps: int) -> None:
    """Let this run's pipeline take the SFT an earlier run made (``earlier``: that run's setting directory):
    its summary, copied under ``out``, names its checkpoint (``deploy.pipeline.finished_sft``)."""
    summary_file = earlier / SFT_DIR / SFT_SUMMARY_FILE
    summary = json.loads(summary_file.read_text())
    if summary["steps"] != steps:
        raise ValueError(f"--reuse: {summary_file} ran {summary['steps']} SFT steps, the config has sft.steps={steps}")
    (out / SFT_DIR).mkdir(parents=True, exist_ok=True)
    (out / SFT_DIR / SFT_SUMMARY_FILE).write_text(json.dumps({**summary, "reused_from": str(summary_file)}, indent=2))


def earlier_control(earlier: Path) -> dict:
    """The SFT control of an earlier run's setting directory: {"checkpoint", "model", "steps", "wall_s"} (runs from
    before ``model`` existed: the checkpoint, which was the model) with all the
    training it had (``CONTROL_SUMMARY_FILE``; runs from before that file: their control's sft_summary.json,
    which is the whole control only when that run did not itself continue a reused one)."""
    whole = earlier / CONTROL_DIR / CONTROL_SUMMARY_FILE
    control_file = whole if whole.is_file() else earlier / CONTROL_DIR / SFT_SUMMARY_FILE
    if not control_file.is_file():
        raise ValueError(f"--reuse: {control_file} is missing (that run's SFT control did not finish)")
    if control_file != whole and "reused_from" in json.loads((earlier / SFT_DIR / SFT_SUMMARY_FILE).read_text()):
        raise ValueError(f"--reuse: {earlier} reused an earlier run and has no {CONTROL_SUMMARY_FILE}: its control's "
                         "summary counts only its own continuation")
    control = json.loads(control_file.read_text())
    return {"model": control["checkpoint"], **control}


def control_start(earlier: dict | None, *, sft_checkpoint: str, rl_seconds: float) -> tuple[str, float, float]:
    """(checkpoint the SFT control continues from, seconds it still has to train, seconds already trained).

    Without an earlier control (``earlier``: its sft_summary), it starts at SFT's checkpoint and trains as long
    as RL did; with one, it continues that control's checkpoint for whatever RL trained beyond it (0: taken
    as it is)."""
    if earlier is None:
        return sft_checkpoint, rl_seconds, 0.0
    return earlier["checkpoint"], max(0.0, rl_seconds - earlier["wall_s"]), earlier["wall_s"]


def run_setting(config, *, out: Path, earlier: Path | None = None) -> dict:
    """Main job, SFT eval and SFT control of one setting; returns their summaries and wall times.
    ``earlier``: the same setting's directory in an earlier run, whose SFT and control are reused."""
    from deploy.pipeline import evaluate_and_report, run_pipeline
    from deploy.sft import run_sft

    config = config.model_copy(update={"train": config.train.model_copy(update={"output_dir": str(out)})})
    reused_control = None
    if earlier is not None:
        reused_control = earlier_control(earlier)
        take_earlier_sft(earlier, out, steps=config.sft.steps)
    if (out / CONTROL_DIR / CONTROL_SUMMARY_FILE).is_file():
        # This --out's own control, from an earlier call of the bench: taken or continued as a reused one is.
        reused_control = earlier_control(out)
    elif (out / CONTROL_DIR).exists():
        # A control that did not finish: training a new one beside its checkpoints would mix the two.
        log.warning("removing %s: an SFT control that did not finish", out / CONTROL_DIR)
        shutil.rmtree(out / CONTROL_DIR)
    pipeline = run_pipeline(config, resume=True)
    rl_seconds = pipeline["stages"]["rl"]["wall_s"]
    sft_checkpoint, sft_model = pipeline["sft_checkpoint"], pipeline["sft_model"]

    start_from, seconds, control_seconds = control_start(reused_control, sft_checkpoint=sft_checkpoint,
                                                        rl_seconds=rl_seconds)
    if seconds > 0:
        control_config = config.model_copy(update={"sft": config.sft.model_copy(
            update={"max_seconds": seconds, "steps": config.sft.steps * 100})})
        control = run_sft(control_config, out_dir=out / CONTROL_DIR, init_from=start_from)
        # the seconds it trained (its summary's, as for a reused control), not its learner's start-up
        control_seconds += control.wall_s
        control_checkpoint, control_model, control_steps = control.checkpoint, control.model, control.steps
    else:  # only an earlier control can have nothing left to train
        control_checkpoint, control_model, control_steps = start_from, reused_control["model"], reused_control["steps"]
        log.info("SFT control taken from %s (%.0f s >= RL's %.0f s)", start_from, control_seconds, rl_seconds)
    (out / CONTROL_DIR).mkdir(parents=True, exist_ok=True)
    (out / CONTROL_DIR / CONTROL_SUMMARY_FILE).write_text(json.dumps(
        {"checkpoint": control_checkpoint, "model": control_model, "steps": control_steps, "wall_s": control_seconds},
        indent=2))

    evals = {"rl": pipeline["eval_json"]}
    for name, model in (("sft", sft_model), ("sft_control", control_model)):
        _, files = evaluate_and_report(config, model_path=model, data=config.data.path, splits=None,
                                       limit=config.train.eval_limit, out=out / "eval" / name, run_dir=None)
        evals[name] = str(files.eval_json)
    result = {name: summarise(path) for name, path in evals.items()}
    result["baseline"] = baseline(evals["sft"])
    result["wall_s"] = {**{k: v["wall_s"] for k, v in pipeline["stages"].items()},
                        "sft_control": round(control_seconds, 1), "sft_control_steps": control_steps}
    result["report"] = pipeline.get("report")
    return result


def target_check(setting: dict) -> dict:
    """The issue's bar for one setting. Presence is checked on each split (``met``, the reading this
    benchmark has always used) and, reported beside it, over both held-out splits together
    (``met_pooled``: rows of easy and hard counted alike). ``met`` is None where it cannot be read (no mIoU)."""
    rl = setting["rl"]
    # mIoU is None on a split with no animal (nothing to box): the bar cannot be read there.
    sft_mious = [setting[name]["hard"]["miou"] for name in ("sft", "sft_control")]
    if rl["hard"]["miou"] is None or None in sft_mious:
        return {"rl_hard_miou": rl["hard"]["miou"], "best_sft_hard_miou": None, "margin": None, "met": None,
                "met_pooled": None, "why": "the hard split has no row with an animal: no mIoU to compare"}
    best_sft = max(sft_mious)
    fmt = min(rl["easy"]["format_validity"], rl["hard"]["format_validity"])
    presence = min(rl["easy"]["presence_accuracy"], rl["hard"]["presence_accuracy"])
    rows = {name: rl[name]["rows"] for name in SPLITS}
    pooled = sum(rl[name]["presence_accuracy"] * rows[name] for name in SPLITS) / sum(rows.values())
    beats = rl["hard"]["miou"] >= best_sft + MIOU_MARGIN and fmt >= MIN_FORMAT
    return {"rl_hard_miou": rl["hard"]["miou"], "best_sft_hard_miou": best_sft,
            "margin": round(rl["hard"]["miou"] - best_sft, 4), "format_validity_min": fmt,
            "presence_accuracy_min": presence, "presence_accuracy_pooled": round(pooled, 4),
            "met": beats and presence >= MIN_PRESENCE, "met_pooled": beats and pooled >= MIN_PRESENCE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-learning", help="working directory (resumable)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "small-cpu.yaml"))
    parser.add_argument("--fewshot-config", default=str(CONFIG_DIR / "fewshot-cpu.yaml"))
    parser.add_argument("--skip-fewshot", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both settings")
    parser.add_argument("--reuse", metavar="DIR", help="an earlier run's --out: take its SFT and SFT control")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from models.config import resolve_model_path

    start = time.perf_counter()
    out = Path(args.out)
    full_config = load_run_config(args.config, args.set)
    began = time.perf_counter()
    resolve_model_path(full_config.model)  # the warm-started default, built once for both settings
    report: dict = {"model_build_s": round(time.perf_counter() - began, 1)}
    earlier = Path(args.reuse) if args.reuse else None
    full = run_setting(full_config, out=out / "full", earlier=earlier / "full" if earlier else None)
    report.update({name: full[name] for name in ("sft", "sft_control", "rl", "baseline")})
    report["full_wall_s"] = full["wall_s"]
    # What each setting ran: "full" is the first setting's name whatever --config names (a few-shot config
    # with --skip-fewshot still lands under "full"), so the result says which config it was.
    report["settings"] = {"full": {"config": str(args.config), "overrides": args.set}}
    report["target"] = {"full": target_check(full)}
    if not args.skip_fewshot:
        fewshot = run_setting(load_run_config(args.fewshot_config, args.set), out=out / "fewshot",
                              earlier=earlier / "fewshot" if earlier else None)
        report["fewshot"] = {name: fewshot[name] for name in ("sft", "sft_control", "rl")}
        report["fewshot_wall_s"] = fewshot["wall_s"]
        report["target"]["fewshot"] = target_check(fewshot)
        report["settings"]["fewshot"] = {"config": str(args.fewshot_config), "overrides": args.set}
    settings = [t for t in report["target"].values() if isinstance(t, dict)]
    report["target"]["met"] = any(t["met"] for t in settings)
    report["target"]["met_pooled"] = any(t["met_pooled"] for t in settings)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    (out / RESULT_FILE).write_text(json.dumps(report, indent=2))  # kept beside the runs it summarises
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
