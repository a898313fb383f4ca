"""RL against its SFT control checkpoint by checkpoint: is RL's held-out margin larger than the spread of one series?

One checkpoint of SFT at its constant lr can be 0.04 hard mIoU from the next (issue #9), the size of the margin the
learning benchmark asks of RL. A run of ``bench.learning`` with ``--set train.checkpoint_every=N --set
sft.checkpoint_every=N`` leaves RL and its SFT control checkpointed every N steps; this evaluates every checkpoint
the way bench.learning does (greedy, ``train.eval_limit`` rows of test_easy and test_hard) and compares the series
over their last checkpoints instead of at their last one:

    sft          the SFT model both start from (training wall time 0): its weight average where SFT ended with one
                 (``sft.average_last``), else its last checkpoint
    sft_control  the control's checkpoints at their training wall time; with ``--reuse`` the earlier run's control
                 is the first point and this run's checkpoints continue it (its wall time added)
    rl           RL's checkpoints at their step's wall time (``events.jsonl``: training time, start-up not counted,
                 as the control's clock and the RL seconds the control is given)

Any other run directory with checkpoints (``refocus train`` without SFT, ``refocus sft --out DIR``) gives one
series, ``run``, and no margin: how one run's checkpoints scatter, and what their average is worth.

A checkpoint is evaluated once: an eval.json already written for it (bench.learning's own, an earlier run's, an
earlier call of this script) is found by the model path it names.

Writes ``<out>/curve.json`` and prints it as ONE JSON object without its ``points`` (every checkpoint's
evaluation): for each series over its last ``--last`` checkpoints the mean, min and max of hard mIoU, found
rate, mIoU of found boxes and presence accuracy (``late``).
``margin_late`` is RL's late mean hard mIoU minus the better of SFT's and the control's late mean. With
``--average``, the weights of those last checkpoints are also averaged into one model per series
(``models.average``), evaluated the same way (``averaged``, ``margin_averaged``). Draws ``<out>/curve.png``: hard
mIoU and hard found rate against training wall time.

    python -m bench.checkpoint_curve runs/bench-zoom-curve/full --config deploy/configs/zoom-cpu.yaml [--last 4]
        [--average]
    python -m bench.checkpoint_curve runs/sft-avg-small --average
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if not __package__:  # run as a script: do not let bench/ shadow the top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from deploy.config import CONFIG_DIR, load_run_config  # noqa: E402
from deploy.evaluate import evaluation_settings  # noqa: E402
from models.average import AVERAGED_FROM_FILE, average_checkpoints  # noqa: E402

log = logging.getLogger("bench.checkpoint_curve")

LATE_FIELDS = ("miou", "found_rate", "miou_found", "presence_accuracy")
CURVE_FILE = "curve.json"
RUN_SERIES = "run"  # the one series of a run directory that is not a bench.learning setting
PLOT_FILE = "curve.png"


def step_walls(events_path: str | Path, *, offset: float = 0.0) -> dict[int, float]:
    """step → training wall seconds (+ ``offset``) from a JSON-lines file of {"step", "wall_s"} events (RL's
    events.jsonl, SFT's sft_events.jsonl); a step logged twice (a resumed run) keeps its last time, and a
    continuation whose clock restarts at 0 (the step after the last one, at fewer seconds) is placed after the
    run it continues. Lines that are not such an event (one a killed run cut mid-write) are skipped and counted,
    as the report skips them."""
    walls, bad = {}, 0
    previous: tuple[int, float] | None = None  # the last event's step and logged seconds
    for line in Path(events_path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            step, wall = int(event["step"]), float(event["wall_s"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            bad += 1
            continue
        if previous is not None and step == previous[0] + 1 and wall < previous[1]:
            # The next step on a clock from 0: a continuation started from this directory's own checkpoint (the
            # bench continuing its control, `--init-from`), which counts its seconds anew.
            offset += previous[1]
        walls[step] = offset + wall
        previous = (step, wall)
    if bad:
        log.warning("checkpoint curve: skipped %d unreadable lines of %s", bad, events_path)
    return walls


def run_checkpoints(run_dir: str | Path, *, events_file: str, offset: float = 0.0) -> list[dict]:
    """[{"step", "wall_s", "checkpoint"}] of the complete checkpoints under ``<run_dir>/checkpoints``, each at its
    step's wall time in ``<run_dir>/<events_file>`` (+ ``offset``); [] where the run wrote no events."""
    from learner.checkpoint import complete_checkpoints

    run = Path(run_dir)
    if not (run / events_file).is_file():
        return []
    walls = step_walls(run / events_file, offset=offset)
    return [{"step": step, "wall_s": walls[step], "checkpoint": str(path)}
            for step, path in complete_checkpoints(run / "checkpoints")]


def checkpoint_series(run_dir: str | Path) -> dict[str, list[dict]]:
    """{series: [{"step", "wall_s", "checkpoint"}, ...]} of a run directory: a bench.learning setting (``<out>/full``)
    or a ``refocus train`` output_dir with an SFT stage gives "sft", "sft_control" (empty without one) and "rl";
    any other (``refocus train`` without SFT, ``refocus sft --out DIR``) one series, "run", of its checkpoints."""
    from deploy.pipeline import SFT_DIR
    from deploy.report import EVENTS_FILE
    from deploy.sft import SFT_EVENTS_FILE, SFT_SUMMARY_FILE

    from bench.learning import CONTROL_DIR, earlier_control

    run = Path(run_dir)
    if not (run / SFT_DIR / SFT_SUMMARY_FILE).is_file():
        events = EVENTS_FILE if (run / EVENTS_FILE).is_file() else SFT_EVENTS_FILE
        return {RUN_SERIES: run_checkpoints(run, events_file=events)}
    sft = json.loads((run / SFT_DIR / SFT_SUMMARY_FILE).read_text())
    # SFT's model: the weight average of its snapshots where the run averaged (sft.average_last), the one RL
    # started from and bench.learning scores as "SFT"; else its last checkpoint. Older summaries lack "model".
    sft_model = sft.get("model", sft["checkpoint"])
    series = {"sft": [{"step": sft["steps"], "wall_s": 0.0, "checkpoint": sft_model}], "sft_control": []}
    offset = 0.0
    if "reused_from" in sft:  # bench.learning --reuse: the earlier run's control is where this one's continues
        control = earlier_control(Path(sft["reused_from"]).parent.parent)
        offset = float(control["wall_s"])
        series["sft_control"].append({"step": control["steps"], "wall_s": offset, "checkpoint": control["checkpoint"]})
    series["sft_control"] += run_checkpoints(run / CONTROL_DIR, events_file=SFT_EVENTS_FILE, offset=offset)
    series["rl"] = run_checkpoints(run, events_file=EVENTS_FILE)
    return series


def known_evals(roots: list[Path], *, limit: int, data_dir: str, settings: dict) -> dict[str, Path]:
    """resolved model path → an eval.json under ``roots`` made on the same rows (``limit`` of ``data_dir``) under the
    same ``settings`` (``deploy.evaluate.evaluation_settings``; one from before they were recorded is not reused)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("eval.json")):
            head = json.loads(path.read_text())
            if (head.get("limit") == limit and Path(head.get("data_dir", "")).resolve() == Path(data_dir).resolve()
                    and head.get("settings") == settings):
                found[str(Path(head["model_path"]).resolve())] = path
    return found


def late_summary(points: list[dict], *, last: int) -> dict:
    """Mean, min and max of each of LATE_FIELDS on the hard split over the last ``last`` points (by wall time),
    and the mean easy mIoU. ``points``: [{"wall_s", "easy": M, "hard": M}]."""
    window = late_window(points, last=last)
    out: dict = {"points": len(window), "steps": [p["step"] for p in window]}
    for name in LATE_FIELDS:
        # None where a checkpoint has no such figure (mIoU found of one that boxed no animal): left out, counted.
        values = [p["hard"][name] for p in window if p["hard"][name] is not None]
        entry = ({"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values)} if values
                 else {"mean": None, "min": None, "max": None})
        if len(values) < len(window):
            entry["missing"] = len(window) - len(values)
        out[f"hard_{name}"] = entry
    easy = [p["easy"]["miou"] for p in window if p["easy"]["miou"] is not None]  # None: no animal in the split
    out["easy_miou_mean"] = round(sum(easy) / len(easy), 4) if easy else None
    return out


def late_margin(hard_miou: dict[str, float]) -> float:
    """RL's hard mIoU minus the better of SFT's and the control's (a series missing is skipped)."""
    return round(hard_miou["rl"] - max(hard_miou[name] for name in ("sft", "sft_control") if name in hard_miou), 4)


def late_window(points: list[dict], *, last: int) -> list[dict]:
    """The last ``last`` points by wall time."""
    return sorted(points, key=lambda p: p["wall_s"])[-last:]


def plot_curve(points: dict[str, list[dict]], late: dict[str, dict], *, out_path: str | Path,
               averaged: dict[str, dict] | None = None) -> None:
    """Hard mIoU and hard found rate against training wall time, one line per series; dashed: late means;
    diamonds (``averaged``): each series' late weight average, at the end of its window."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(10, 4))
    colours = {"sft": "black", "sft_control": "tab:blue", "rl": "tab:red", RUN_SERIES: "tab:green"}
    for axis, field, title in zip(figure.subplots(1, 2), ("miou", "found_rate"),
                                  ("held-out hard mIoU", "held-out hard found rate")):
        for name, series in points.items():
            if not series:
                continue
            walls = [p["wall_s"] for p in series]
            axis.plot(walls, [p["hard"][field] for p in series], "o-" if len(series) > 1 else "*",
                      color=colours[name], label=name, markersize=8 if len(series) == 1 else 4)
            if name in late and len(series) > 1:
                start = sorted(walls)[-late[name]["points"]]
                axis.hlines(late[name][f"hard_{field}"]["mean"], start, max(walls), colors=colours[name],
                            linestyles="dashed")
            if averaged and name in averaged and len(series) > 1:
                axis.plot([max(walls)], [averaged[name]["hard"][field]], "D", color=colours[name], markersize=9,
                          markerfacecolor="white", label=f"{name} weight average")
        axis.set_xlabel("training wall time after SFT (s)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting_dir", help="a bench.learning setting directory (<out>/full or <out>/fewshot), or "
                        "any run directory with checkpoints (refocus train's output_dir, refocus sft's --out)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "small-cpu.yaml"), help="the run's config (evaluation)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--last", type=int, default=4, help="checkpoints per series in the late mean")
    parser.add_argument("--average", action="store_true", help="also evaluate each series' late weight average")
    parser.add_argument("--out", help="default: <setting_dir>/curve")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from bench.learning import summarise
    from deploy.pipeline import evaluate_and_report

    config = load_run_config(args.config, args.set)
    setting = Path(args.setting_dir)
    out = Path(args.out) if args.out else setting / "curve"
    out.mkdir(parents=True, exist_ok=True)
    series = checkpoint_series(setting)
    averages = {}  # series → {"steps", "checkpoint"}: the weight average of its late window
    for name in [n for n in series if n != "sft"] if args.average else ():
        window = late_window(series[name], last=args.last)
        steps = [p["step"] for p in window]
        if len(steps) < 2:
            continue
        model = out / name / ("average_" + "_".join(map(str, steps))) / "model"
        if not (model / AVERAGED_FROM_FILE).is_file():  # written last: the average is complete
            average_checkpoints([p["checkpoint"] for p in window], model)
        averages[name] = {"steps": steps, "checkpoint": str(model)}
    roots = {setting, out} | {Path(p["checkpoint"]).parents[2] for p in series.get("sft_control", [])}
    evals = known_evals(sorted(roots), limit=config.train.eval_limit, data_dir=config.data.path,
                        settings=evaluation_settings(config, config.train.eval_modes))
    wanted = [p["checkpoint"] for ps in series.values() for p in ps] + [a["checkpoint"] for a in averages.values()]
    todo = [c for c in wanted if str(Path(c).resolve()) not in evals]
    log.info("%d models, %d to evaluate", len(wanted), len(todo))

    def evaluation(checkpoint: str, out_dir: Path) -> dict:
        key = str(Path(checkpoint).resolve())
        if key not in evals:
            log.info("evaluating %d/%d: %s", todo.index(checkpoint) + 1, len(todo), checkpoint)
            _, files = evaluate_and_report(config, model_path=checkpoint, data=config.data.path, splits=None,
                                           limit=config.train.eval_limit, out=out_dir, run_dir=None)
            evals[key] = files.eval_json
        return {"eval_json": str(evals[key]), **summarise(evals[key])}

    points = {name: [{**p, **evaluation(p["checkpoint"], out / name / f"step_{p['step']}")} for p in ps]
              for name, ps in series.items()}
    late = {name: late_summary(ps, last=args.last) for name, ps in points.items() if ps}
    result = {"points": points, "late": late, "last": args.last, "margin_late": None}
    if "rl" in late:
        result["margin_late"] = late_margin({name: v["hard_miou"]["mean"] for name, v in late.items()})
    if averages:
        result["averaged"] = {name: {**average, **evaluation(average["checkpoint"], Path(average["checkpoint"]).parent)}
                              for name, average in averages.items()}
        for name, ps in points.items():
            window = late_window(ps, last=args.last)
            if name not in result["averaged"] and len(window) == 1:  # one model (SFT, averaged already where SFT
                point = window[0]                                    # averaged; a control taken as it was): its
                result["averaged"][name] = {"steps": [point["step"]],  # own "average", not left out of the margin
                                            "easy": point["easy"], "hard": point["hard"]}
        result["margin_averaged"] = (late_margin({name: v["hard"]["miou"] for name, v in result["averaged"].items()})
                                     if "rl" in averages else None)
    plot_curve(points, late, out_path=out / PLOT_FILE, averaged=result.get("averaged"))
    (out / CURVE_FILE).write_text(json.dumps(result, indent=2))
    print(json.dumps({key: value for key, value in result.items() if key != "points"} | {"plot": str(out / PLOT_FILE)},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
