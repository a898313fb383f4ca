"""How well can the boxes be read from a checkpoint's vision tower alone — what any readout of it can reach?

RL keeps the tower frozen (``learner.freeze_vision``), so whatever it teaches the language model, its boxes
are read from the same embeddings as SFT's. This probe estimates how good such a readout can get: fresh
synthetic images with an animal (the training split's mix: half easy, half hard) go through the tower
alone; a small network regresses the box from the merged tokens — a per-token layer, then an MLP over the
whole grid, trained on (1 - IoU) + L1 with early stopping on fresh validation images — on up to many times
the images SFT sees. It is scored with the evaluation's own ``row_iou`` on the present rows of a data set's
held-out splits. Every present image gets a box (an oracle verdict), so the probe's mean IoU is the mIoU a
model reading this tower would reach with a found rate of 1; the evaluation's mIoU is
``found_rate × miou_found``. Each training size's figure is a lower bound on what the embeddings hold; the
curve over sizes shows whether more images would still raise it. The best fixed box on the same rows is the
baseline measured in the same run.

Prints ONE JSON object, {checkpoint: {"probe": {train_images: {...}}, ...}, "fixed_box": {...}}.

    python -m bench.box_probe CHECKPOINT [CHECKPOINT ...] [--data artifacts/data/synth-small]
        [--train 3000 12000] [--val 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: do not let bench/ shadow the top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("bench.box_probe")

SPLITS = ("test_easy", "test_hard")
TOKEN_WIDTH = 128  # the per-token layer's output
HIDDEN = 512
BATCH = 256
LR = 1e-3
MAX_EPOCHS = 60
PATIENCE = 6  # epochs without a better validation IoU before stopping


def fresh_images(*, n: int, seed: int, image_size: int) -> tuple[list, list[list[float]]]:
    """``n`` fresh images with one animal each, half easy and half hard (the synthetic set's ranges), and
    each one's pixel-edge box."""
    import numpy as np

    from data.synth import CATEGORIES, SynthConfig, generate_sample

    ranges = SynthConfig(seed=0, n=1)
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    while len(images) < n:
        low, high = ranges.hard_range if len(images) % 2 else ranges.easy_range
        sample = generate_sample(rng, image_size=image_size, difficulty=float(rng.uniform(low, high)),
                                 category=CATEGORIES[len(images) % len(CATEGORIES)])
        if sample.boxes:  # an animal placed wholly off the body mask's threshold has none: draw again
            images.append(sample.image)
            boxes.append(sample.boxes[0])
    return images, boxes


def held_out_rows(data_dir: Path, split: str) -> list[dict]:
    """The present rows of one held-out split as the evaluation reads them (``load_split``: valid rows only),
    each with its decoded image under "pixels"."""
    from actors.env import decode_image
    from deploy.evaluate import load_split

    rows = [r for r in load_split(data_dir / f"{split}.parquet", limit=None).rows.values() if r["present"]]
    return [{**r, "pixels": decode_image(r["image"])} for r in rows]


class BoxProbe:
    """tokens [I, T, width] → boxes [I, 4] as (x1, y1, x2, y2) fractions of the image side."""

    def __init__(self, tokens: int, width: int, *, seed: int):
        import torch

        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(width, TOKEN_WIDTH), torch.nn.GELU(), torch.nn.Flatten(),
            torch.nn.Linear(tokens * TOKEN_WIDTH, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, 4))
        self.mean = self.std = None

    def __call__(self, tokens):
        import torch

        centre_size = torch.sigmoid(self.net((tokens - self.mean) / self.std))
        centre, half = centre_size[:, :2], centre_size[:, 2:] / 2
        return torch.cat([(centre - half).clamp(0, 1), (centre + half).clamp(0, 1)], dim=1)

    def fit(self, tokens, boxes, *, val_tokens, val_boxes) -> dict:
        """Adam on (1 - IoU) + L1 over ``tokens`` [I, T, width] / ``boxes`` [I, 4]; keeps the epoch with the
        best validation IoU. Returns {"epochs": trained, "best_epoch": e, "val_miou": iou}."""
        import copy

        import torch

        self.mean, self.std = tokens.mean(dim=(0, 1)), tokens.std(dim=(0, 1)) + 1e-5
        optimizer = torch.optim.Adam(self.net.parameters(), lr=LR)
        best = (-1.0, 0, None)
        for epoch in range(1, MAX_EPOCHS + 1):
            self.net.train()
            for batch in torch.randperm(len(tokens)).split(BATCH):
                pred = self(tokens[batch])
                loss = (1 - box_iou(pred, boxes[batch])).mean() + (pred - boxes[batch]).abs().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            self.net.eval()
            with torch.no_grad():
                val_iou = float(box_iou(self(val_tokens), val_boxes).mean())
            if val_iou > best[0]:
                best = (val_iou, epoch, copy.deepcopy(self.net.state_dict()))
            elif epoch - best[1] >= PATIENCE:
                break
        self.net.load_state_dict(best[2])
        return {"epochs": epoch, "best_epoch": best[1], "val_miou": best[0]}


def box_area(boxes):
    """Areas of boxes [I, 4] (x1, y1, x2, y2) → [I]; 0 for an inverted box."""
    return (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)


def box_iou(a, b):
    """Row-wise IoU of boxes a, b [I, 4] (x1, y1, x2, y2) → [I]."""
    import torch

    inter = box_area(torch.cat([torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])], dim=1))
    return inter / (box_area(a) + box_area(b) - inter).clamp(min=1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data/synth-small"),
                        help="a synthetic data set whose held-out splits the probe is scored on")
    parser.add_argument("--train", type=int, nargs="+", default=[3000, 12000],
                        help="training sizes (each the first N of one stream of fresh images)")
    parser.add_argument("--val", type=int, default=2000, help="fresh validation images for early stopping")
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from bench.tower_probe import tower_tokens
    from deploy.evaluate import B_FIXED_BOX_MIOU, baseline, row_iou

    rows = {split: held_out_rows(args.data, split) for split in SPLITS}
    sizes = sorted(set(args.train))
    t0 = time.perf_counter()
    train_images, train_boxes = fresh_images(n=sizes[-1], seed=300, image_size=args.image_size)
    val_images, val_boxes = fresh_images(n=args.val, seed=400, image_size=args.image_size)
    log.info("rendered %d + %d images in %.0f s", len(train_images), len(val_images), time.perf_counter() - t0)
    side = float(args.image_size)

    def to_fraction(boxes: list[list[float]]):
        return torch.tensor(boxes, dtype=torch.float32) / side

    out: dict = {"fixed_box": {split: baseline(rows[split])[B_FIXED_BOX_MIOU] for split in SPLITS}}
    for checkpoint in args.checkpoints:
        t0 = time.perf_counter()
        held_out = [r["pixels"] for split in SPLITS for r in rows[split]]
        tokens = tower_tokens(checkpoint, train_images + val_images + held_out, progress_every=4096)
        extract_s = time.perf_counter() - t0
        train_tokens, rest = tokens[: sizes[-1]], tokens[sizes[-1] :]
        val_tokens, test_tokens = rest[: args.val], rest[args.val :]
        result: dict = {"extract_s": round(extract_s, 1), "probe": {}}
        for size in sizes:
            probe = BoxProbe(tokens.shape[1], tokens.shape[2], seed=0)
            fitted = probe.fit(train_tokens[:size], to_fraction(train_boxes[:size]),
                               val_tokens=val_tokens, val_boxes=to_fraction(val_boxes))
            with torch.no_grad():
                predicted = (probe(test_tokens) * side).tolist()
            scores, start = {}, 0
            for split in SPLITS:
                mine = predicted[start : start + len(rows[split])]
                start += len(rows[split])
                scores[split] = sum(row_iou([box], r["boxes"], width=r["width"], height=r["height"])
                                    for box, r in zip(mine, rows[split])) / len(rows[split])
            result["probe"][str(size)] = {**fitted, **{f"{split}_miou": v for split, v in scores.items()}}
            log.info("%s, %d images: %s", checkpoint, size, result["probe"][str(size)])
        out[checkpoint] = result
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
