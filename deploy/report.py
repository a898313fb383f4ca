"""The evaluation report: ``eval.json`` (every number), ``report.md`` and its PNGs.

Written into one output directory:
- ``eval.json``: the dict ``deploy.evaluate.evaluate`` returned, as it is;
- ``curves.png`` (when given a run directory): reward total and each reward component per learner
  step from ``<run>/events.jsonl``, each point coloured by the curriculum stage it was trained under;
- ``examples_<split>.png``: the first rows of each split with ground-truth boxes in green, the
  model's boxes in magenta and the regions it zoomed into in yellow (``data.contact_sheet``);
- ``report.md``: the metrics next to the data-only baselines, the pictures, and what each figure means.
Lines of ``events.jsonl`` that do not parse (a run killed mid-write) are counted and skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.contact_sheet import draw_contact_sheet
from rewards.components import COMPONENTS
from deploy.evaluate import (
    ALL_TASKS,
    B_FIXED_BOX,
    B_FIXED_BOX_MIOU,
    B_MAJORITY_PRESENCE,
    M_AP50,
    M_ANSWERED,
    M_CATEGORY,
    M_DISTINCT,
    M_FORMAT,
    M_FOUND,
    M_MIOU,
    M_MIOU_FOUND,
    M_PRED_BOXES,
    M_PRESENCE,
    M_PRESENCE_AUC,
    M_ROWS,
    M_TOKENS,
    M_ZOOMS,
    load_split,
)

log = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"
EVENTS_FILE = "events.jsonl"  # what deploy.driver writes (deploy.driver.EVENTS_FILE; not imported: it pulls in Ray)
EXAMPLE_COLUMNS = 4
EXAMPLE_TILE = 224
EXAMPLE_TEXTS = 3  # completions quoted per split in report.md
# Distinct colours of curriculum stages in the curves (matplotlib's tab10 order).
STAGE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

# The metrics table: (column title, key, where: "m" model metrics or "b" baseline, kind: "rate" or "count").
_COLUMNS = (
    ("rows", M_ROWS, "m", "count"),
    ("format", M_FORMAT, "m", "rate"),
    ("answered", M_ANSWERED, "m", "rate"),
    ("presence", M_PRESENCE, "m", "rate"),
    ("majority presence", B_MAJORITY_PRESENCE, "b", "rate"),
    ("presence AUC", M_PRESENCE_AUC, "m", "rate"),
    ("category", M_CATEGORY, "m", "rate"),
    ("mIoU", M_MIOU, "m", "rate"),
    ("found", M_FOUND, "m", "rate"),
    ("mIoU found", M_MIOU_FOUND, "m", "rate"),
    ("fixed-box mIoU", B_FIXED_BOX_MIOU, "b", "rate"),
    ("AP@0.5", M_AP50, "m", "rate"),
    ("distinct answers", M_DISTINCT, "m", "count"),
    ("boxes/answer", M_PRED_BOXES, "m", "count"),
    ("tokens", M_TOKENS, "m", "count"),
    ("zooms", M_ZOOMS, "m", "count"),
)
_SHORT_COLUMNS = ("rows", "format", "presence", "category", "mIoU", "fixed-box mIoU", "AP@0.5", "distinct answers")

DEFINITIONS = """\
- **format**: share of samples that follow `<think>…</think>(<zoom> turns)<answer>JSON</answer>` exactly, JSON
  without repair. **answered**: share from which an answer could be extracted at all.
- **presence**: accuracy of the present/absent decision over all rows (no answer = wrong); **majority presence**
  is what always answering the more frequent class scores.
- **category**: normalised exact match on present rows that have a category.
- **mIoU**: present rows; each ground-truth box is paired one-to-one with a predicted box (assignment maximising
  IoU) and a row scores the mean IoU over its ground-truth boxes (0 unpaired; no answer 0). Extra boxes are not
  penalised here (see AP@0.5 and boxes/answer). **fixed-box mIoU**: the best single box, the same for every image,
  found by a small search ON these rows: a model below it has not learnt to look.
- **found**: share of the present rows whose answer gives a box; **mIoU found**: mIoU over those rows. In greedy
  mode mIoU = found × mIoU found, so a model that boxes better and one that says "none" less often can be told
  apart (sampled: each run's product, averaged, so only approximately).
- **AP@0.5**: all predicted boxes ranked by confidence (else by their order in the answer), greedy matching at
  IoU ≥ 0.5, all-point interpolated AP, equal scores entering together. Answers that state no confidences (the
  SFT grammar has none) tie on every first box, so AP@0.5 is then precision × recall at the model's own
  operating point, not a ranking measure.
- **presence AUC**: the ROC AUC of each row's share of samples answering "present". Greedy (one sample per row)
  that is the balanced accuracy of the verdict (mean recall on rows with and without an object; 0.5 for a
  constant answer), not how well the model could rank rows under another threshold.
- **distinct answers**: different normalised answers (presence, category, boxes to whole pixels) among the
  extracted ones. One answer for many rows means the model ignores the image.
- **tokens**: model-generated completion tokens per sample; **zooms**: zoom turns per sample.
- Sampled mode: every figure is the mean over the n samples of each row (one "run" per sample index).
"""


@dataclass
class ReportFiles:
    out_dir: Path
    eval_json: Path
    report_md: Path
    curves: Path | None
    examples: dict[str, Path] = field(default_factory=dict)
    bad_event_lines: int = 0


def read_events(path: str | Path) -> tuple[list[dict], int]:
    """(step events with an int ``step``, ``stage`` and numeric ``reward_total``, one per step in step order,
    lines skipped). A resumed run appends the steps it trains again after its checkpoint: the last line of a
    step is the one the final model descends from."""
    by_step, bad = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                ok = (isinstance(event, dict) and isinstance(event.get("step"), int)
                      and isinstance(event.get("stage"), int) and isinstance(event.get("reward_total"), (int, float)))
            except json.JSONDecodeError:
                ok = False
            if ok:
                by_step[event["step"]] = event
            else:
                bad += 1
    if bad:
        log.warning("report: skipped %d unreadable lines of %s", bad, path)
    return [by_step[step] for step in sorted(by_step)], bad


def plot_curves(events: Sequence[dict], *, out_path: str | Path, stage_names: Sequence[str] | None = None) -> None:
    """Reward total and every reward component per step, one panel each, points coloured by stage."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    seen = {name for e in events for name in (e.get("rewards") or {}) if name != "total"}
    components = [name for name in COMPONENTS if name in seen] + sorted(seen - set(COMPONENTS))
    series = [("reward total", lambda e: e["reward_total"])]
    series += [(name, lambda e, n=name: (e.get("rewards") or {}).get(n)) for name in components]
    columns = min(3, len(series))
    grid_rows = -(-len(series) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * grid_rows), dpi=100, layout="constrained")
    stages = sorted({e["stage"] for e in events})
    for index, (title, value) in enumerate(series):
        axes = figure.add_subplot(grid_rows, columns, index + 1)
        points = [(e["step"], value(e), e["stage"]) for e in events if isinstance(value(e), (int, float))]
        axes.plot([p[0] for p in points], [p[1] for p in points], color="#bbbbbb", linewidth=1, zorder=1)
        for stage in stages:
            mine = [p for p in points if p[2] == stage]
            named = stage_names is not None and stage < len(stage_names)
            label = f"stage {stage + 1}" + (f": {stage_names[stage]}" if named else "")
            axes.scatter([p[0] for p in mine], [p[1] for p in mine], s=14, zorder=2, label=label,
                         color=STAGE_COLOURS[stage % len(STAGE_COLOURS)])
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("learner step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if index == 0:
            axes.legend(fontsize=7)
    figure.savefig(out_path, format="png")


def _number(value, kind: str = "rate") -> str:
    """A table cell: rates with 3 decimals, counts whole when whole (means of counts with 1 decimal)."""
    if value is None:
        return "–"
    if kind == "count":
        return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.3f}"


def metrics_table(result: dict, *, task: str = ALL_TASKS, short: bool = False) -> list[str]:
    """Markdown table rows: one per split and mode, model metrics beside the split's baselines
    (``short``: only the headline columns, for a terminal)."""
    columns = [c for c in _COLUMNS if not short or c[0] in _SHORT_COLUMNS]
    head = "| split | mode | " + " | ".join(column[0] for column in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for split, entry in result["splits"].items():
        base = entry["baseline"][ALL_TASKS] if task == ALL_TASKS else entry["baseline"]["by_task"].get(task)
        for mode, tables in entry["modes"].items():
            metrics = tables[ALL_TASKS] if task == ALL_TASKS else tables["by_task"].get(task)
            if metrics is None or base is None:
                continue
            cells = [_number((metrics if where == "m" else base).get(key), kind) for _, key, where, kind in columns]
            lines.append(f"| {split} | {mode} | " + " | ".join(cells) + " |")
    return lines


def _example_sheets(result: dict, out_dir: Path) -> dict[str, Path]:
    """One contact sheet per split of its example rows with the predicted boxes."""
    sheets: dict[str, Path] = {}
    data_dir = Path(result["data_dir"])
    for split, entry in result["splits"].items():
        examples = {e["id"]: e for e in entry.get("examples", [])}
        path = data_dir / f"{split}.parquet"
        if not examples or not path.is_file():
            continue
        # The rows as the evaluation read them (valid, first of a duplicated id, boxes clamped), in its order.
        valid = load_split(path, limit=None).rows
        rows = [valid[i] for i in examples if i in valid]
        # Rows without an extracted answer get no prediction: the sheet labels them "pred: none".
        predictions = {i: e for i, e in examples.items() if e["answered"]}
        sheets[split] = out_dir / f"examples_{split}.png"
        draw_contact_sheet(rows, out_path=sheets[split], columns=EXAMPLE_COLUMNS, tile=EXAMPLE_TILE,
                           predictions=predictions)
    return sheets


def write_report(*, result: dict, out_dir: str | Path, run_dir: str | Path | None = None,
                 stage_names: Sequence[str] | None = None) -> ReportFiles:
    """Write eval.json, report.md, the example sheets and (with ``run_dir``) the training curves."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out_dir=out, eval_json=out / EVAL_JSON, report_md=out / REPORT_MD, curves=None)
    files.eval_json.write_text(json.dumps(result, indent=2))
    events: list[dict] = []
    if run_dir is not None:
        events_path = Path(run_dir) / EVENTS_FILE
        if not events_path.is_file():
            raise FileNotFoundError(f"run dir: no {EVENTS_FILE} in {run_dir}")
        events, files.bad_event_lines = read_events(events_path)
        if events:
            files.curves = out / CURVES_PNG
            plot_curves(events, out_path=files.curves, stage_names=stage_names)
    files.examples = _example_sheets(result, out)
    files.report_md.write_text(_markdown(result, files=files, events=events, run_dir=run_dir))
    return files


def _markdown(result: dict, *, files: ReportFiles, events: list[dict], run_dir) -> str:
    modes = ", ".join(f"{m} (temperature {s['temperature']}, n {s['n']}, max {s['max_tokens']} tokens/turn)"
                      for m, s in result["modes"].items())
    md = [f"# Evaluation of `{result['model_path']}`", "",
          f"Data `{result['data_dir']}`; engine {result['engine']}; boxes in the `{result['frame']}` frame; "
          f"modes: {modes}" + (f"; first {result['limit']} rows per split" if result.get("limit") else "")
          + f"; {result['seconds']:.1f} s.", "", "## Metrics", "", *metrics_table(result), ""]
    tasks = sorted({t for e in result["splits"].values() for m in e["modes"].values() for t in m["by_task"]})
    if len(tasks) > 1:
        for task in tasks:
            md += [f"### Task `{task}`", "", *metrics_table(result, task=task), ""]
    md += ["Best fixed boxes (fractions of width and height): "
           + "; ".join(f"{split} {e['baseline'][ALL_TASKS][B_FIXED_BOX]}" for split, e in result["splits"].items()), ""]
    for split, entry in result["splits"].items():
        if entry["bad_rows"]:
            md += [f"Skipped in {split}: corrupt rows by field {entry['bad_rows']}.", ""]
        bad = {m: t["bad_prompts"] for m, t in entry["modes"].items() if t["bad_prompts"]}
        if bad:
            md += [f"Prompts the rollout worker rejected in {split}, by mode: {bad}.", ""]
    md += ["## What the terms mean", "", DEFINITIONS]
    if run_dir is not None:
        md += ["## Training", ""]
        if files.curves is not None:
            last = events[-1]
            md += [f"Run `{run_dir}`: {len(events)} learner steps, last step {last['step']} in stage "
                   f"{last['stage'] + 1} with reward {last['reward_total']:.3f}."
                   + (f" {files.bad_event_lines} unreadable event lines skipped." if files.bad_event_lines else ""),
                   "", f"![training curves]({CURVES_PNG})", ""]
        else:
            md += [f"Run `{run_dir}` has no readable learner steps yet.", ""]
    md += ["## Examples", "",
           "Ground truth in green, the model's boxes in magenta (first sample of the first mode).", ""]
    for split, sheet in files.examples.items():
        md += [f"### {split}", "", f"![{split} examples]({sheet.name})", ""]
        for example in result["splits"][split]["examples"][:EXAMPLE_TEXTS]:
            # As a JSON string: one line, whitespace and control characters visible.
            md += [f"`{example['id']}` (IoU {_number(example['iou'])}):", "", "```",
                   json.dumps(example["text"], ensure_ascii=False), "```", ""]
    return "\n".join(md)
