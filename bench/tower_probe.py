"""How well does a checkpoint's vision tower tell "animal" from "no animal", before any text is read?

A linear probe: fresh synthetic images of one difficulty range (half of them empty) go through the
tower alone; each image becomes its merged tokens max- and mean-pooled (2 × width features,
standardised on the training images); an L2-regularised logistic regression fitted on ``--train``
images is scored on ``--test`` others. Reports the test ROC AUC (0.5: the tower cannot tell) and the
accuracy at probability 0.5, per checkpoint, with the same images for every checkpoint. The language
model can read no more than the tower gives: compare towers (warm-start recipes) with this before
paying for SFT on each (``bench.presence_ranking`` measures the same question through the language model).

Prints ONE JSON object, {checkpoint: {...}}.

    python -m bench.tower_probe CHECKPOINT [CHECKPOINT ...] [--difficulty 0.6 0.9] [--train 1600] [--test 800]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if not __package__:  # run as a script: do not let bench/ shadow the top-level packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("bench.tower_probe")

L2 = 0.1  # the best of 1e-3, 1e-2, 1e-1 for each of three small-model towers (hard range), fixed since
BATCH_IMAGES = 64


def probe_images(*, n: int, seed: int, difficulty: tuple[float, float], image_size: int) -> tuple[list, list[bool]]:
    """``n`` fresh images, each empty with probability 1/2, and whether an animal is in it."""
    import numpy as np

    from data.synth import CATEGORIES, generate_sample

    rng = np.random.default_rng(seed)
    images, present = [], []
    for _ in range(n):
        category = None if rng.random() < 0.5 else CATEGORIES[rng.integers(len(CATEGORIES))]
        sample = generate_sample(rng, image_size=image_size, difficulty=float(rng.uniform(*difficulty)),
                                 category=category)
        images.append(sample.image)
        present.append(sample.category is not None)
    return images, present


def tower_tokens(checkpoint: str, images: list, *, progress_every: int = 0):
    """[I, T, width]: each image's merged tokens (the embeddings the language model reads), in grid order.
    Every image must have the same size (one grid). Logs progress every ``progress_every`` images (0: never)."""
    import torch
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    visual = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval().model.visual
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), BATCH_IMAGES):
            chunk = images[start : start + BATCH_IMAGES]
            inputs = processor(images=chunk, return_tensors="pt")
            tokens = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
            chunks.append(tokens.view(len(chunk), -1, tokens.shape[-1]))
            if progress_every and (start // BATCH_IMAGES + 1) % max(1, progress_every // BATCH_IMAGES) == 0:
                log.info("tower tokens: %d / %d images", start + len(chunk), len(images))
    return torch.cat(chunks)


def tower_features(checkpoint: str, images: list):
    """[I, 2·width]: each image's merged tokens, max-pooled then mean-pooled."""
    import torch

    tokens = tower_tokens(checkpoint, images)
    return torch.cat([tokens.amax(dim=1), tokens.mean(dim=1)], dim=1)


def fit_probe(features, labels, *, l2: float = L2):
    """Logistic regression (L-BFGS) on standardised ``features`` [I, F] for ``labels`` [I] (float 0/1);
    returns a function from features to logits [I]."""
    import torch

    mean, std = features.mean(dim=0), features.std(dim=0) + 1e-5
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels)
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda f: ((f - mean) / std) @ weight + bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--difficulty", nargs=2, type=float, default=(0.6, 0.9), help="the hard split's range")
    parser.add_argument("--train", type=int, default=1600, help="images the probe is fitted on")
    parser.add_argument("--test", type=int, default=800, help="images it is scored on")
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from deploy.evaluate import roc_auc

    low, high = args.difficulty
    drawn_as = dict(difficulty=(low, high), image_size=args.image_size)  # both sets, different seeds
    train_images, train_present = probe_images(n=args.train, seed=100, **drawn_as)
    test_images, test_present = probe_images(n=args.test, seed=200, **drawn_as)
    train_labels = torch.tensor(train_present, dtype=torch.float32)
    test_labels = torch.tensor(test_present)
    out = {}
    for checkpoint in args.checkpoints:
        log.info("probing %s on %d + %d images, difficulty %.2f-%.2f", checkpoint, args.train, args.test, low, high)
        features = tower_features(checkpoint, train_images + test_images)  # the checkpoint is loaded once
        probe = fit_probe(features[: args.train], train_labels)
        logits = probe(features[args.train :])
        out[checkpoint] = {
            "auc": roc_auc(logits[test_labels].tolist(), logits[~test_labels].tolist()),
            "accuracy_at_half": float(((logits > 0) == test_labels).float().mean()),
            "train_images": args.train, "test_images": args.test, "difficulty": [low, high], "l2": L2,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
