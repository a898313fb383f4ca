"""Can a checkpoint tell images with an animal from images without, whatever its threshold?

For a model trained with the brief think (``sft.think: brief``: ``<think>present CATEGORY</think>`` or
``<think>none</think>``; the grammar before it thought ``<think>CATEGORY</think>``), the first think
token decides presence. One forward pass per held-out image (transformers, the run's prompt) gives
P(first think token = the first token of "none"); ranking the images by it measures what the model
sees, apart from where it puts its threshold:

    auc                     ROC AUC of P("none") for "no animal" (0.5: cannot tell)
    accuracy_at_half        presence accuracy when "none" is answered iff P("none") > 0.5
    miss_rate               at P("none") > 0.5: the share of images with an animal answered "none"
    false_alarm_rate        at P("none") > 0.5: the share of images without one answered "present" (on the
                            training images: which errors RL's presence reward could correct)
    best_threshold_accuracy the best presence accuracy any threshold on P("none") reaches (fitted on the
                            split itself: an upper bound for calibration alone)
    majority_accuracy       the baseline of the same rows: always answer the majority class
    mixed_groups            the expected share of RL groups (rollout.sampling.n samples at its temperature)
                            whose presence verdicts disagree: GRPO learns presence from these groups only
    mixed_groups_of_errors  the same over the rows the greedy verdict gets wrong (those RL would have to flip)

Prints ONE JSON object, {split: {...}} per checkpoint; with ``--by-difficulty`` also {"split/easy": ...,
"split/hard": ...} for each split that mixes them (train).

    python -m bench.presence_ranking CHECKPOINT [CHECKPOINT ...] [--data artifacts/data/synth-small]
        [--config deploy/configs/small-cpu.yaml] [--limit 250] [--splits test_easy test_hard] [--by-difficulty]
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

log = logging.getLogger("bench.presence_ranking")

THINK_OPEN = "<think>"
BATCH_IMAGES = 25


def none_probabilities(checkpoint: str, splits: dict[str, list[dict]], *, prompt_config) -> dict[str, list[float]]:
    """P(first think token = first token of "none") for each row's image, per split, in row order (the
    checkpoint is loaded once for all splits)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.processor import load_processor

    processor = load_processor(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor.tokenizer.padding_side = "left"  # every prompt's next token is then the last position
    return {split: _split_probabilities(model, processor, rows, prompt_config=prompt_config)
            for split, rows in splits.items()}


def _split_probabilities(model, processor, rows: list[dict], *, prompt_config) -> list[float]:
    import torch

    from actors.env import ImageLimits, decode_image
    from data.prompts import build_messages
    from rewards.think import NO_ANIMAL

    limits = ImageLimits.of(processor.image_processor)
    none_id = processor.tokenizer(NO_ANIMAL, add_special_tokens=False)["input_ids"][0]
    out: list[float] = []
    for start in range(0, len(rows), BATCH_IMAGES):
        texts, images = [], []
        for row in rows[start : start + BATCH_IMAGES]:
            image = decode_image(row["image"])  # load_split kept only rows whose image decodes
            messages = build_messages(question=row["question"], task=row["task"], width=image.width,
                                      height=image.height, config=prompt_config,
                                      input_size=limits.input_size(image.width, image.height))
            texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                         + THINK_OPEN)
            images.append(image)
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        out += torch.softmax(logits.float(), dim=-1)[:, none_id].tolist()
    return out


def mixed_group_probability(p_none, *, samples: int, temperature: float):
    """P(a group of ``samples`` completions sampled at ``temperature`` holds both verdicts), per image.

    ``p_none``: P("none") at temperature 1 (array or float). The verdict is treated as a two-way choice
    (what is not "none" is "present"), so temperature T samples "none" with q = p^(1/T) / (p^(1/T) + (1-p)^(1/T)),
    and the group is mixed with probability 1 - q^n - (1-q)^n."""
    import numpy as np

    p = np.clip(np.asarray(p_none, dtype=float), 1e-12, 1 - 1e-12)
    none, present = p ** (1 / temperature), (1 - p) ** (1 / temperature)
    q = none / (none + present)
    return 1 - q**samples - (1 - q) ** samples


def ranking(p_none: list[float], absent: list[bool], *, samples: int = 8, temperature: float = 1.0) -> dict:
    """The figures of the module docstring for one split (``samples``, ``temperature``: RL's sampling)."""
    import numpy as np

    from deploy.evaluate import roc_auc

    p, y = np.asarray(p_none), np.asarray(absent, dtype=bool)
    thresholds = np.concatenate([[-1.0], np.unique(p)])  # "none" iff p > t; -1: always "none"
    best = max(float(((p > t) == y).mean()) for t in thresholds)
    mixed = mixed_group_probability(p, samples=samples, temperature=temperature)
    wrong = (p > 0.5) != y  # the greedy verdict's errors
    return {"rows": int(len(y)), "absent": int(y.sum()), "auc": roc_auc(p[y], p[~y]),
            "accuracy_at_half": float(1 - wrong.mean()),
            "miss_rate": float(wrong[~y].mean()) if (~y).any() else None,
            "false_alarm_rate": float(wrong[y].mean()) if y.any() else None,
            "best_threshold_accuracy": best,
            "majority_accuracy": float(max(y.mean(), 1 - y.mean())), "mixed_groups": float(mixed.mean()),
            "mixed_groups_of_errors": float(mixed[wrong].mean()) if wrong.any() else None}


def row_groups(split: str, rows: list[dict], by_difficulty: bool) -> dict[str, list[int]]:
    """{name: row indices} to report for one split: the whole split, and with ``by_difficulty`` also
    "split/easy" and "split/hard" where the split mixes difficulties (train; a test split holds one)."""
    groups = {split: list(range(len(rows)))}
    difficulties = sorted({row["difficulty"] for row in rows}) if by_difficulty else []
    if len(difficulties) > 1:
        for difficulty in difficulties:
            groups[f"{split}/{difficulty}"] = [i for i, row in enumerate(rows) if row["difficulty"] == difficulty]
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default="artifacts/data/synth-small")
    parser.add_argument("--config", default=str(CONFIG_DIR / "small-cpu.yaml"),
                        help="run config: its prompt and RL's sampling")
    parser.add_argument("--limit", type=int, default=250, help="first N valid rows of each split")
    parser.add_argument("--splits", nargs="+", default=["test_easy", "test_hard"])
    parser.add_argument("--by-difficulty", action="store_true", help="also report each split's easy and hard rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from deploy.evaluate import load_split

    config = load_run_config(args.config)
    sampling = config.rollout.sampling
    splits = {split: list(load_split(Path(args.data) / f"{split}.parquet", limit=args.limit).rows.values())
              for split in args.splits}
    result: dict = {}
    for checkpoint in args.checkpoints:
        log.info("%s: %s", checkpoint, {split: len(rows) for split, rows in splits.items()})
        p_none = none_probabilities(checkpoint, splits, prompt_config=config.rollout.prompt)
        result[checkpoint] = {
            name: ranking([p_none[split][i] for i in index], [not rows[i]["present"] for i in index],
                          samples=sampling.n, temperature=sampling.temperature)
            for split, rows in splits.items() for name, index in row_groups(split, rows, args.by_difficulty).items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
