"""What a run directory records about the settings that made it, and the check a resume makes against them.

An SFT writes ``sft_settings.json`` (``deploy.sft.sft_settings``), an RL run ``run_config.json`` (its whole
resolved config, ``rl_settings`` picks what is compared). Continuing either with settings that would train
other weights mixes two runs into one directory, so it is refused with the fields that differ; what only
says how long a run goes, where it runs or how it reports may change on a resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"  # <train.output_dir>/run_config.json: the RL run's resolved RunConfig
BUFFER_DIR = "buffer"  # <train.output_dir>/buffer: the trajectory buffer's spill directory

# Learner fields that say where and how a learner runs, not what it trains: SFT's record and RL's leave them out.
LEARNER_PLACEMENT = frozenset({"num_cpus_per_rank", "num_gpus_per_rank", "placement_strategy", "cpu_cores", "device",
                               "log_entropy", "gradient_checkpointing"})

# RunConfig fields an RL resume may change: how long it runs (a resume may extend it, with the decay's end), where
# and on what it runs (`refocus scale` changes the rollout workers anyway), how it reports and is evaluated at the
# end, and the SFT stage, which its own record covers. Every other field, new ones included, is compared.
# section → its fields left out (None: the whole section)
_RL_NOT_COMPARED: dict[str, frozenset[str] | set[str] | None] = {
    "cluster": None, "metrics": None, "sft": None,
    "train": {"steps", "buffer_capacity", "verify_weight_sync", "checkpoint_every", "output_dir", "eval_at_end",
              "eval_limit", "eval_modes", "run_name"},
    "learner": {"max_steps"} | LEARNER_PLACEMENT,
    "rollout": {"engine"},
    "data": {"synth", "eval_splits", "max_bad_fraction"},
}


def rl_settings(run_config: dict, *, model_from_sft: bool = False) -> dict:
    """The part of a RunConfig (as ``model_dump(mode="json")``) that determines what an RL run trains;
    ``model_from_sft``: without the model, which the run's SFT stage makes (and its own record checks)."""
    compared = {}
    for section, fields in run_config.items():
        left_out = _RL_NOT_COMPARED.get(section, set())
        if left_out is None or (model_from_sft and section == "model"):
            continue
        compared[section] = {k: v for k, v in fields.items() if k not in left_out}  # (sft, the one None, is left out)
    return compared


def settings_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """``"key.path: recorded -> current"`` for every leaf where two nested dicts differ (sorted)."""
    differences = []
    for key in sorted(set(recorded) | set(current)):
        before, now = recorded.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            differences += settings_differences(before, now, f"{prefix}{key}.")
        elif before != now:
            differences.append(f"{prefix}{key}: {before!r} -> {now!r}")
    return differences


def refuse_other_settings(recorded: dict, current: dict, *, directory: Path, setting: str, what: str) -> None:
    """Raise a ValueError naming ``setting`` (what names ``directory``) when the settings ``directory`` recorded
    differ from ``current``; ``what`` says what the directory holds ("an SFT")."""
    differences = settings_differences(recorded, current)
    if differences:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise ValueError(f"{setting}: {directory} holds {what} trained with other settings ({shown}); "
                         f"give this run another {setting} or remove that directory")


def check_rl_resume(out_dir: Path, config_dump: dict, *, setting: str, model_from_sft: bool = False) -> None:
    """Refuse to resume the RL run in ``out_dir`` with a config (``RunConfig.model_dump(mode="json")``) that
    trains otherwise; log the changes a resume may make (more steps, other workers). Runs from before the
    record are not checked. ``model_from_sft``: the main job checks before its SFT stage has made the model."""
    recorded_file = out_dir / RUN_CONFIG_FILE
    if not recorded_file.is_file():
        return
    recorded = json.loads(recorded_file.read_text())
    refuse_other_settings(rl_settings(recorded, model_from_sft=model_from_sft),
                          rl_settings(config_dump, model_from_sft=model_from_sft),
                          directory=out_dir, setting=setting, what="an RL run")
    if model_from_sft:
        return  # the Driver checks again with the model, and logs the changes then
    for change in settings_differences(recorded, config_dump):
        log.info("resume with a changed setting: %s", change)


def trim_events(path: Path, *, last_step: int) -> None:
    """Make a run's JSON-lines step log (RL's events.jsonl, SFT's sft_events.jsonl) fit a run that continues after
    ``last_step``: drop the events of later steps (those a crash left after the checkpoint it resumes from:
    trained again, or never if the resumed run ends sooner), and a last line a crash cut mid-write (no newline),
    onto which the next event would otherwise be appended and lost with it. Other lines are kept as they are."""
    if not path.exists():
        return
    kept, dropped, mended = [], 0, False
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            event = json.loads(line)
            step = event.get("step")
        except (json.JSONDecodeError, AttributeError):
            event, step = None, None
        if isinstance(step, int) and step > last_step:
            dropped += 1
        elif line.endswith("\n"):
            kept.append(line)
        elif event is None:
            dropped += 1  # the last line, cut mid-write
        else:
            kept.append(line + "\n")  # the last line, whole but for its newline
            mended = True
    if dropped or mended:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
        log.info("resume: dropped %d lines (events of steps after %d, or cut) from %s", dropped, last_step, path)


def refuse_buffered_run(out: Path, *, setting: str) -> None:
    """Raise if ``out`` holds the buffered groups of an RL run that stopped before its first checkpoint (a fresh
    run there would abandon them; the buffer would refuse its directory, but only once every actor is up)."""
    from actors.buffer import holds_groups

    if holds_groups(Path(out) / BUFFER_DIR):
        raise ValueError(f"{setting}: {out} holds the buffered groups of a run that stopped before its first "
                         f"checkpoint; pass --resume to train them, or set another {setting}")
