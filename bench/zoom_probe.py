"""Would a zoom help? A checkpoint evaluated on the held-out splits and on oracle zooms of them.

Each row of test_easy / test_hard is cut to the square region a perfect first turn would zoom onto
(``actors.env.zoom_region`` around the ground-truth boxes, ``--context`` times their longer side) and
shown as the zoom environment shows a crop (resized to ``env.zoom_pixels``, bicubic), with its boxes
mapped into the crop; rows without an animal get a region of a size drawn from the present rows',
placed at random. The checkpoint answers about the crop in ONE turn, as if it were the image, and is
scored greedily like ``refocus eval``. IoU is unchanged by cropping both boxes the same way, so the
crop's mIoU is what a two-turn answer after that zoom would score; presence on crops is not comparable
(an empty crop is easier to call empty than an empty image). A model never trained on zoomed views
gives a lower bound of what zoom traces could reach.

Prints ONE JSON object, {"original": {"easy": M, "hard": M}, "<context>": {...}, ...}, M as in
``bench.learning``.

    python -m bench.zoom_probe CHECKPOINT [--context 1.4 1.8] [--config deploy/configs/small-cpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if not __package__:  # run as a script: do not let bench/ shadow the top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("bench.zoom_probe")

SPLITS = ("test_easy", "test_hard")


def zoomed_rows(rows: list[dict], *, context: float, min_side: int, zoom_pixels: int, limits, seed: int) -> list[dict]:
    """``rows`` cut to their oracle zoom regions and shown as the zoom environment shows a crop."""
    import numpy as np

    from actors.env import decode_image, encode_png, show_region, zoom_region

    rng = np.random.default_rng(seed)
    regions = {r["id"]: zoom_region(r["boxes"], width=r["width"], height=r["height"], context=context,
                                    min_side=min_side) for r in rows if r["boxes"]}
    sides = [region[2] - region[0] for region in regions.values()]
    out = []
    for row in rows:
        region = regions.get(row["id"])
        if region is None:  # no animal: a region of a present row's size, anywhere
            side = min(int(rng.choice(sides)), row["width"], row["height"])
            left, top = int(rng.integers(0, row["width"] - side + 1)), int(rng.integers(0, row["height"] - side + 1))
            region = (left, top, left + side, top + side)
        image = show_region(decode_image(row["image"]), region, pixels=zoom_pixels, limits=limits)
        sx, sy = image.width / (region[2] - region[0]), image.height / (region[3] - region[1])
        boxes = [[(b[0] - region[0]) * sx, (b[1] - region[1]) * sy, (b[2] - region[0]) * sx, (b[3] - region[1]) * sy]
                 for b in row["boxes"]]
        out.append({**row, "image": encode_png(image), "width": image.width, "height": image.height, "boxes": boxes})
    return out


def evaluate_dir(config, *, checkpoint: str, data_dir: Path, limit: int) -> dict:
    """{"easy": M, "hard": M} of the checkpoint on ``data_dir``'s splits (greedy)."""
    from bench.learning import summarise
    from deploy.evaluate import GREEDY, evaluate

    result = evaluate(model_path=checkpoint, data_dir=data_dir, config=config, modes=(GREEDY,), limit=limit,
                      examples=0)
    (data_dir / "eval.json").write_text(json.dumps(result, indent=1))
    return summarise(data_dir / "eval.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--config", default="deploy/configs/small-cpu.yaml")
    parser.add_argument("--data", default=None, help="data directory (default: the config's data.path)")
    parser.add_argument("--context", type=float, nargs="+", default=[1.4, 1.8])
    parser.add_argument("--limit", type=int, default=250, help="rows per split")
    parser.add_argument("--out", default="runs/zoom-probe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from actors.env import ImageLimits
    from data.schema import write_rows
    from deploy.config import load_run_config
    from deploy.evaluate import load_split
    from models.processor import load_processor

    config = load_run_config(args.config)
    data_dir = Path(args.data or config.data.path)
    limits = ImageLimits.of(load_processor(args.checkpoint).image_processor)
    out = Path(args.out)
    result = {}
    original = out / "original"
    original.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = list(load_split(data_dir / f"{split}.parquet", limit=args.limit).rows.values())
        write_rows(rows, original / f"{split}.parquet")
    result["original"] = evaluate_dir(config, checkpoint=args.checkpoint, data_dir=original, limit=args.limit)
    for context in args.context:
        zoomed = out / f"context-{context}"
        zoomed.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = list(load_split(original / f"{split}.parquet", limit=None).rows.values())
            write_rows(zoomed_rows(rows, context=context, min_side=config.rollout.env.min_crop_side,
                                   zoom_pixels=config.rollout.env.zoom_pixels, limits=limits, seed=args.seed),
                       zoomed / f"{split}.parquet")
        result[str(context)] = evaluate_dir(config, checkpoint=args.checkpoint, data_dir=zoomed, limit=args.limit)
        log.info("context %s: %s", context, json.dumps(result[str(context)]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
