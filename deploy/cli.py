"""The ``refocus`` command line.

Every subcommand is a thin layer over a library function: parse flags, call, report. User mistakes
(bad config, missing file, invalid value) print one clear ``error:`` line and exit 2 — no traceback.
Heavy packages are imported inside the handlers so ``refocus --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from deploy.jobs import ClusterError  # stdlib-only module: importing it keeps `refocus --help` fast

log = logging.getLogger("refocus")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               ClusterError)


# --------------------------------------------------------------------------- model / data / rewards


def cmd_model_build(args) -> int:
    from models.build import RECIPES, build_model

    recipe = RECIPES[args.size]
    if args.warm_start_steps is not None:
        if args.warm_start_steps < 0:
            raise ValueError(f"--warm-start-steps: must be >= 0, got {args.warm_start_steps}")
        warm_start = None
        if args.warm_start_steps:
            from models.warmstart import WarmStartConfig

            warm_start = (recipe.warm_start or WarmStartConfig()).model_copy(update={"steps": args.warm_start_steps})
        recipe = recipe.model_copy(update={"warm_start": warm_start})
    path = build_model(size=args.size, out_dir=args.out, seed=args.seed, recipe=recipe)
    print(path)
    return 0


def _progress_bar(description: str, unit: str = "img"):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit=unit)
        if total != bar.total:  # an estimate that moves (SFT bounded by max_seconds)
            bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def cmd_data_synth(args) -> int:
    from data.synth import synthesize

    report = synthesize(
        out_dir=args.out, seed=args.seed, n=args.n, image_size=args.image_size, progress=_progress_bar("synth")
    )
    print(json.dumps({"files": report.files, "counts": report.counts, "contact_sheet": report.contact_sheet,
                      "seconds": round(report.seconds, 2)}, indent=2, default=str))
    return 0


def cmd_data_import(args) -> int:
    from data.importers import import_camo_folder, import_coco

    if args.format == "coco":
        if not args.images:
            raise ValueError("--images is required for --format coco")
        report = import_coco(
            annotations_json=args.src, images_dir=args.images, out=args.out, split=args.split,
            progress=_progress_bar("import"),
        )
    else:
        report = import_camo_folder(
            src=args.src, out=args.out, layout=args.format, split=args.split, progress=_progress_bar("import")
        )
    print(report.summary())
    return 0


def cmd_rewards_score(args) -> int:
    from deploy.config import load_run_config
    from rewards.score_file import score_jsonl

    config = load_run_config(args.config, args.set)
    # Zero-based, as the run numbers stages everywhere it records them (events.jsonl, spilled groups,
    # curriculum.stages.N), so a dumped row's stage picks the weights it was trained under.
    stage_weights = {i: stage.reward_weights for i, stage in enumerate(config.curriculum.stages)}
    source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    with source:
        for result in score_jsonl(source, config=config.rewards, stage_weights=stage_weights):
            print(json.dumps(result))
    return 0


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "small-cpu.yaml"  # the main job on the embedded default
MAIN_JOB = "deploy/configs/small-cpu.yaml, the main job"


def cmd_train(args) -> int:
    from deploy.config import load_run_config
    from deploy.pipeline import run_pipeline

    config = load_run_config(args.config or DEFAULT_CONFIG, args.set)
    # The pipeline's stages with a bar: SFT counts optimiser steps, evaluation counts images.
    summary = run_pipeline(config, resume=args.resume,
                           progress=lambda stage: _progress_bar(stage, unit="step" if stage == "sft" else "img"))
    print(json.dumps(summary, indent=2, default=str))
    if "eval_json" in summary:
        from deploy.evaluate import ALL_TASKS
        from deploy.report import metrics_table

        result = json.loads(Path(summary["eval_json"]).read_text())
        print("\n".join(metrics_table(result, task=ALL_TASKS, short=True)))
    return 0


def cmd_sft(args) -> int:
    from deploy.config import load_run_config
    from deploy.sft import run_sft

    config = load_run_config(args.config or DEFAULT_CONFIG, args.set)
    if config.sft is None:
        raise ValueError("sft: the config has no sft section (add one, or --set sft.steps=N)")
    out = Path(args.out) if args.out else Path(config.train.output_dir) / "sft"
    summary = run_sft(config, out_dir=out, init_from=args.init_from, resume=args.resume,
                      progress=_progress_bar("sft", unit="step"))
    print(json.dumps(summary.__dict__, indent=2, default=str))
    return 0


def cmd_eval(args) -> int:
    from deploy.config import load_run_config
    from models.config import ModelConfig, resolve_model_path

    config = load_run_config(args.config or DEFAULT_CONFIG, args.set)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {args.limit}")
    if args.run_dir is not None:  # before minutes of evaluation, not when the report is written
        from deploy.driver import EVENTS_FILE

        if not (Path(args.run_dir) / EVENTS_FILE).is_file():
            raise FileNotFoundError(f"--run-dir: no {EVENTS_FILE} in {args.run_dir} (an RL run's directory: "
                                    f"its curves come from the rewards of its steps)")
    # CHECKPOINT is a local model directory (e.g. <run>/checkpoints/step_N) or builtin:tiny / builtin:small.
    model_path = resolve_model_path(ModelConfig(path=args.checkpoint, cache_dir=config.model.cache_dir,
                                                seed=config.model.seed))
    default_out = Path(args.run_dir or ".") / "eval" / Path(args.checkpoint).name.replace(":", "-")
    _evaluate_and_report(config, model_path=model_path, data=args.data, splits=args.splits, limit=args.limit,
                         out=Path(args.out) if args.out else default_out, run_dir=args.run_dir)
    return 0


def _evaluate_and_report(config, *, model_path, data, splits, limit, out, run_dir) -> None:
    from deploy.evaluate import ALL_TASKS
    from deploy.pipeline import evaluate_and_report
    from deploy.report import metrics_table

    result, files = evaluate_and_report(config, model_path=model_path, data=data, splits=splits, limit=limit,
                                        out=out, run_dir=run_dir, progress=_progress_bar("eval"))
    print(files.eval_json)
    print("\n".join(metrics_table(result, task=ALL_TASKS, short=True)))
    print(files.report_md)


def cmd_config_check(args) -> int:
    from deploy.config import load_run_config

    config = load_run_config(args.config, args.set)
    if args.show:
        print(config.model_dump_json(indent=2))
    else:
        print(f"{args.config or 'defaults'}: valid")
    return 0


# --------------------------------------------------------------------------- jobs on a Ray cluster

DEFAULT_JOB_ADDRESS = "http://127.0.0.1:8265"  # the dashboard of a Ray on this machine, as `ray job` assumes


def _job_address(args) -> str:
    return args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_JOB_ADDRESS


def _cluster_address(args) -> str:
    return args.address or os.environ.get("RAY_ADDRESS") or "auto"


def _token(args) -> str | None:
    from deploy.jobs import read_token_file

    return read_token_file(args.token_file) if args.token_file else None


def _key_values(items: list[str], *, flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value
    return pairs


def cmd_submit(args) -> int:
    from deploy import jobs

    job = jobs.submit(
        args.config, address=_job_address(args), overrides=args.set, run_name=args.run_name,
        working_dir=args.working_dir, env_vars=_key_values(args.env, flag="--env"), pip=args.pip or None,
        token=_token(args),
    )
    print(job)  # alone on stdout, so `JOB=$(refocus submit ...)` works
    return 0


def cmd_status(args) -> int:
    from deploy import jobs

    print(json.dumps(jobs.status(args.job, address=_job_address(args), token=_token(args)), indent=2))
    return 0


def cmd_logs(args) -> int:
    from deploy import jobs

    for chunk in jobs.logs(args.job, address=_job_address(args), follow=args.follow, token=_token(args)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_stop(args) -> int:
    from deploy import jobs

    stopped = jobs.stop(args.job, address=_job_address(args), token=_token(args))
    print(json.dumps({"submission_id": args.job, "stop_requested": stopped}))
    return 0


def cmd_scale(args) -> int:
    from deploy import jobs

    result = jobs.scale(args.run, address=_cluster_address(args), rollout_workers=args.rollout_workers,
                        token=_token(args), wait_s=args.wait)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_stage_advance(args) -> int:
    from deploy import jobs

    result = jobs.advance_stage(args.run, address=_cluster_address(args), reason=args.reason, token=_token(args),
                                wait_s=args.wait)
    print(json.dumps(result, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------- parser


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = False, default: str = "built-in defaults") -> None:
    p.add_argument("config", nargs=None if required else "?", help=f"run config YAML (default: {default})")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set learner.lr=1e-6",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refocus",
        description="Reinforcement fine-tuning of vision-language models on visual perception.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="build the embedded default model").add_subparsers(
        dest="model_command", required=True, metavar="ACTION"
    )
    p = model.add_parser("build", help="write a Qwen2.5-VL checkpoint directory (small: vision tower warm-started)")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny ≈1.2M params, small ≈10M")
    p.add_argument("--warm-start-steps", type=int, help="perception warm-start steps (0: random vision tower; "
                   "default: the size's recipe, models/build.py RECIPES: small warm-starts, tiny does not)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_model_build)

    data = sub.add_parser("data", help="generate or import data sets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("synth", help="generate the synthetic camouflage data set (Parquet + contact sheet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=600, help="number of images over all splits")
    p.add_argument("--image-size", type=int, default=112, help="square image side in pixels")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("import", help="convert COD10K / CAMO / NC4K folders or a COCO JSON to Parquet")
    p.add_argument("src", help="benchmark folder, or the COCO annotations JSON")
    p.add_argument("--format", choices=["cod10k", "camo", "nc4k", "coco"], required=True)
    p.add_argument("--images", help="images folder (COCO only)")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--split", default="train")
    p.set_defaults(func=cmd_data_import)

    rewards = sub.add_parser("rewards", help="debug rewards on dumped completions").add_subparsers(
        dest="rewards_command", required=True, metavar="ACTION"
    )
    p = rewards.add_parser(
        "score",
        help="score a JSONL file of completions; prints one JSON object per row",
        description="Each row: {completion, target: {boxes, category, present, width, height}, frame, stage}. "
        "The 'input' frame needs input_width/input_height in the row (see rewards/score_file.py).",
    )
    p.add_argument("file", help="JSONL file, or - for standard input")
    p.add_argument("--config", help="run config whose rewards and stages to use (default: built-in)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    p.set_defaults(func=cmd_rewards_score)

    p = sub.add_parser(
        "train", help="the main job: model, data, SFT, RL with the curriculum, evaluation and report",
        description="Builds the model and data if missing, runs SFT (if the config has an sft section), then the "
        "RL driver (rollouts, rewards, buffer, learner, weight sync, checkpoints, /metrics), then evaluates the "
        "final checkpoint and writes the report. Default config: the embedded small-cpu learning run.",
    )
    _add_config_args(p, default=MAIN_JOB)
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sft", help="supervised warm start (cross-entropy on target answers) with the run's learner backend",
        description="Trains on the config's training rows as the rollout would prompt them; writes "
        "OUT/checkpoints/step_N (model directories RL and eval start from), sft_events.jsonl, sft_summary.json.",
    )
    _add_config_args(p, default=MAIN_JOB)
    p.add_argument("--out", help="output directory (default: TRAIN.OUTPUT_DIR/sft)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last complete checkpoint")
    p.add_argument("--init-from", help="start from this SFT checkpoint's full state (e.g. the SFT control)")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on test splits; writes eval.json, report.md and PNGs",
        description="Rollouts over every row of each split in the modes of train.eval_modes (greedy, sampled; "
        "engine, prompts and zoom environment from the run config): format, presence, category, mIoU, AP@0.5, "
        "tokens, zooms, the best fixed-box baseline and the number of distinct answers.",
    )
    p.add_argument("checkpoint", help="model directory (e.g. RUN/checkpoints/step_N) or builtin:tiny")
    p.add_argument("--data", required=True, help="directory of <split>.parquet files")
    p.add_argument("--config", help="run config YAML (default: deploy/configs/small-cpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--run-dir", help="training run directory: adds its reward curves from events.jsonl")
    p.add_argument("--out", help="output directory (default: RUN_DIR/eval/<checkpoint name>, or ./eval/<name>)")
    p.add_argument("--limit", type=int, help="evaluate only the first N valid rows of each split")
    p.add_argument("--splits", nargs="+", help="split names (default: the config's data.eval_splits)")
    p.set_defaults(func=cmd_eval)

    _add_job_parsers(sub)

    config = sub.add_parser("config", help="validate run configs").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    p = config.add_parser("check", help="validate a run config (errors name the field)")
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the validated config with all defaults")
    p.set_defaults(func=cmd_config_check)
    return parser


def _add_job_parsers(sub) -> None:
    """submit / status / logs / stop (the dashboard's job API) and scale / stage (a running job's control actor)."""

    def job_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help=f"the cluster's dashboard URL (default: $RAY_API_SERVER_ADDRESS, "
                                         f"else {DEFAULT_JOB_ADDRESS})")
        p.add_argument("--token-file", help="file holding the Ray auth token (default: $RAY_AUTH_TOKEN, "
                                            "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")

    def control_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("run", help="the run name (a submitted job's id)")
        p.add_argument("--address", help="the cluster's GCS address HOST:PORT (default: $RAY_ADDRESS, else auto)")
        p.add_argument("--token-file", help="file holding the Ray auth token (default: as for submit)")
        p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait this long for the run to appear (a job just submitted is still setting up)")

    p = sub.add_parser(
        "submit", help="submit `refocus train CONFIG` to a Ray cluster as a job; prints the job id (= run name)",
        description="Uploads --working-dir (without .venv, .tmp, .cache, artifacts, runs, .git), which must "
        "contain CONFIG; the config is validated here first.",
    )
    _add_config_args(p, required=True)
    job_flags(p)
    p.add_argument("--run-name", help="job id and run name (default: refocus-<time>-<random>)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's current directory")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the job and its actors, repeatable")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="extra pip requirement installed for the job, repeatable")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) as JSON")
    p.add_argument("job", help="job id printed by submit")
    job_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a job's output (the driver's step lines)")
    p.add_argument("job", help="job id printed by submit")
    p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    job_flags(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a job")
    p.add_argument("job", help="job id printed by submit")
    job_flags(p)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("scale", help="change a running job's number of rollout workers",
                       description="Retired workers finish their in-flight calls first; nothing is lost.")
    control_flags(p)
    p.add_argument("--rollout-workers", type=int, required=True, help="desired number of rollout workers")
    p.set_defaults(func=cmd_scale)

    stage = sub.add_parser("stage", help="steer a running job's curriculum").add_subparsers(
        dest="stage_command", required=True, metavar="ACTION"
    )
    p = stage.add_parser("advance", help="move the curriculum to its next stage now")
    control_flags(p)
    p.add_argument("--reason", default="manual", help="recorded with the transition")
    p.set_defaults(func=cmd_stage_advance)


def _one_line(error: Exception) -> str:
    """A pydantic error raised outside config loading (a flag such as ``data synth --n 0`` validated into a model)
    as "field: reason" items, not pydantic's several-line dump with its documentation links."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        items = [f"{'.'.join(str(p) for p in e['loc']) or error.title}: {e['msg']}" for e in error.errors()]
        return f"invalid {error.title}: " + "; ".join(items)
    return str(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from deploy.config_loading import ConfigError

    try:
        return args.func(args)
    except (ConfigError, *USER_ERRORS) as e:
        if args.verbose:  # show where it came from when asked
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`refocus logs JOB | head`): not an error of ours. Point stdout at /dev/null so the
        # interpreter's final flush does not fail again, and exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
