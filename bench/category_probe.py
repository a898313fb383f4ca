"""Can a checkpoint's vision tower learn WHAT the animal is — from the whole image, or from a zoom onto it?

The held-out category accuracy of every model so far is near chance (0.15-0.30 over 7 categories). This
asks whether the categories can be learnt at all by the tower, and from which view: a copy of the tower
is fine-tuned with a linear head on its mean-pooled image tokens (plain cross-entropy, no text) on fresh
synthetic images with an animal, shown either

    whole   the image as the model sees it (the animal ~30-40 px of 112)
    crop    the square a zoom onto the animal shows (``actors.env.zoom_region``, ``--context`` times its
            longer side, centred), enlarged to the image's size, as Chain-of-Focus's second turn sees it

and scored after every epoch on held-out images of the same view. Both views run from the same checkpoint
on the same animals, so the whole view is the baseline measured in the same run.

Prints ONE JSON object, {view: {"accuracy_per_epoch": [...], "seconds": s, ...}}.

    python -m bench.category_probe CHECKPOINT [--views whole crop] [--train 4200] [--epochs 4] [--context 1.2]
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

log = logging.getLogger("bench.category_probe")

VIEWS = ("whole", "crop")
BATCH_IMAGES = 32


def view_images(*, view: str, n: int, seed: int, difficulty: tuple[float, float], context: float,
                image_size: int, limits) -> tuple[list, list[int]]:
    """``n`` fresh images with an animal (categories in turn, so balanced) as ``view`` shows them, and
    each one's category index. The same ``seed`` draws the same animals for every view. A crop is shown
    by the zoom environment's own ``show_region`` at the image's area (``limits``: the processor's)."""
    import numpy as np
    from PIL import Image

    from actors.env import show_region, zoom_region
    from data.synth import CATEGORIES, generate_sample

    if view not in VIEWS:
        raise ValueError(f"view: expected one of {VIEWS}, got {view!r}")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(CATEGORIES)
        sample = generate_sample(rng, image_size=image_size, difficulty=float(rng.uniform(*difficulty)),
                                 category=CATEGORIES[label])
        image = Image.fromarray(sample.image)
        if view == "crop":
            region = zoom_region(sample.boxes, width=image_size, height=image_size, context=context, min_side=1)
            image = show_region(image, region, pixels=image_size * image_size, limits=limits)
        images.append(image)
        labels.append(label)
    return images, labels


def train_view(checkpoint: str, *, processor, train: tuple[list, list[int]], test: tuple[list, list[int]],
               epochs: int, lr: float, seed: int) -> dict:
    """Fine-tune a fresh copy of ``checkpoint``'s tower and a linear head on ``train``; held-out accuracy
    on ``test`` after each epoch."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from data.synth import CATEGORIES

    torch.manual_seed(seed)
    visual = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).model.visual
    head = torch.nn.Linear(visual.config.out_hidden_size, len(CATEGORIES))
    params = list(visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def encode(images):
        inputs = processor(images=images, return_tensors="pt")
        return inputs["pixel_values"].view(len(images), -1, inputs["pixel_values"].shape[-1]), inputs["image_grid_thw"]

    def logits(pixels, grid):  # pixels [B, patches, patch_dim], every image of one size
        tokens = visual(pixels.reshape(-1, pixels.shape[-1]), grid_thw=grid).pooler_output
        return head(tokens.view(pixels.shape[0], -1, tokens.shape[-1]).mean(dim=1))

    train_pixels, train_grid = encode(train[0])
    test_pixels, test_grid = encode(test[0])
    train_labels, test_labels = torch.tensor(train[1]), torch.tensor(test[1])
    accuracies, start = [], time.perf_counter()
    for epoch in range(epochs):
        visual.train()
        order = torch.randperm(len(train_labels))
        for first in range(0, len(order), BATCH_IMAGES):
            batch = order[first : first + BATCH_IMAGES]
            loss = torch.nn.functional.cross_entropy(logits(train_pixels[batch], train_grid[batch]),
                                                     train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        visual.eval()
        with torch.no_grad():
            predicted = torch.cat([logits(test_pixels[i : i + BATCH_IMAGES], test_grid[i : i + BATCH_IMAGES]).argmax(1)
                                   for i in range(0, len(test_labels), BATCH_IMAGES)])
        accuracies.append(float((predicted == test_labels).float().mean()))
        log.info("epoch %d/%d: held-out category accuracy %.3f (chance %.3f), %.0f s", epoch + 1, epochs,
                 accuracies[-1], 1 / len(CATEGORIES), time.perf_counter() - start)
    return {"accuracy_per_epoch": accuracies, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS))
    parser.add_argument("--train", type=int, default=4200, help="training images per view")
    parser.add_argument("--test", type=int, default=700, help="held-out images per view")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--difficulty", nargs=2, type=float, default=(0.2, 0.45), help="the easy split's range")
    parser.add_argument("--context", type=float, default=1.2, help="crop side over the animal's longer side")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from transformers import AutoImageProcessor

    from actors.env import ImageLimits
    from data.synth import CATEGORIES

    processor = AutoImageProcessor.from_pretrained(args.checkpoint, backend="pil")
    drawn_as = dict(difficulty=tuple(args.difficulty), context=args.context, image_size=args.image_size,
                    limits=ImageLimits.of(processor))
    out = {}
    for view in args.views:
        log.info("%s view: %d + %d images, %d epochs", view, args.train, args.test, args.epochs)
        train = view_images(view=view, n=args.train, seed=100, **drawn_as)
        test = view_images(view=view, n=args.test, seed=200, **drawn_as)
        result = train_view(args.checkpoint, processor=processor, train=train, test=test, epochs=args.epochs,
                            lr=args.lr, seed=0)
        out[view] = {**result, "chance": 1 / len(CATEGORIES), "train_images": args.train, "test_images": args.test,
                     "difficulty": list(args.difficulty), **({"context": args.context} if view == "crop" else {})}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
