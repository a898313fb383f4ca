"""The ``refocus`` command line.

Every subcommand is a thin layer over a library function: parse flags, call, report. User mistakes
(bad config, missing file, invalid value) print one clear ``error:`` line and exit 2 — no traceback.
Heavy packages are imported inside the handlers so ``refocus --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("refocus")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


# --------------------------------------------------------------------------- model / data / rewards


def cmd_model_build(args) -> int:
    from models.build import build_model

    path = build_model(size=args.size, out_dir=args.out, seed=args.seed)
    print(path)
    return 0


def _progress_bar(description: str):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=description, unit="img")
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
    stage_weights = {i + 1: stage.reward_weights for i, stage in enumerate(config.curriculum.stages)}
    source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    with source:
        for result in score_jsonl(source, config=config.rewards, stage_weights=stage_weights):
            print(json.dumps(result))
    return 0


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny-cpu.yaml"


def cmd_train(args) -> int:
    from deploy.config import load_run_config
    from deploy.driver import Driver

    config = load_run_config(args.config or DEFAULT_CONFIG, args.set)
    driver = Driver(config, resume=args.resume)
    try:
        summary = driver.run()
    finally:
        driver.shutdown()
    print(json.dumps(summary.__dict__, indent=2, default=str))
    return 0


def cmd_config_check(args) -> int:
    from deploy.config import load_run_config

    config = load_run_config(args.config, args.set)
    if args.show:
        print(config.model_dump_json(indent=2))
    else:
        print(f"{args.config or 'defaults'}: valid")
    return 0


# --------------------------------------------------------------------------- parser


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("config", nargs=None if required else "?", help="run config YAML (default: built-in defaults)")
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
    p = model.add_parser("build", help="write a random-initialised Qwen2.5-VL checkpoint directory")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny ≈1.2M params, small ≈10M")
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
        "train", help="run a training job (default: the embedded tiny-cpu config on a local Ray)",
        description="Runs the driver: rollouts, rewards, buffer, learner, weight sync, checkpoints, /metrics.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="validate run configs").add_subparsers(
        dest="config_command", required=True, metavar="ACTION"
    )
    p = config.add_parser("check", help="validate a run config (errors name the field)")
    _add_config_args(p)
    p.add_argument("--show", action="store_true", help="print the validated config with all defaults")
    p.set_defaults(func=cmd_config_check)
    return parser


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
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
