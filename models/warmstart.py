"""Perception warm start: teach the vision tower of a freshly built model to see, before any text.

A small VLM trained from scratch by SFT alone learns the box prior and ignores the image (measured:
one answer for every image, below the best fixed box; ARCHITECTURE.md §9). So the builder first trains
the vision tower (patch embedding, blocks and merger) with a DENSE objective on its output grid — the
very embeddings the language model later reads at the ``<|image_pad|>`` positions — through a linear
head that is dropped afterwards. For every merged cell (one image token) the head predicts:

    objectness   share of the cell covered by an animal's body mask           BCE on a soft target
    category     the animal's category, on cells the body covers (>= 30 %)    cross-entropy
                 and once per image from its tokens pooled by body coverage    cross-entropy
    box edges    (cx - x1, cy - y1, x2 - cx, y2 - cy) / side, on cells whose   L1
                 centre lies inside a box (FCOS-style: every token knows its object's extent)

Each step renders fresh synthetic images (``data.synth.generate_sample``), never a fixed set, so the
tower cannot memorise; the difficulty knob ramps from the easy range to the whole range over the
first ``easy_first_fraction`` of the steps (easy first). The language model is not touched.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

# Metric names of the warm start's progress records.
WS_LOSS = "warmstart/loss"
WS_OBJECTNESS = "warmstart/objectness_loss"
WS_CATEGORY = "warmstart/category_loss"
WS_BOX = "warmstart/box_loss"
WS_IMAGE_CATEGORY = "warmstart/image_category_loss"
WS_CELL_ACCURACY = "warmstart/category_cell_accuracy"
# Held-out diagnostics (fresh images of another seed, the whole difficulty range).
WS_HELD_HIT = "warmstart/heldout_objectness_hit"  # the most object-like cell lies on the animal
WS_HELD_HIT_CHANCE = "warmstart/heldout_objectness_hit_chance"  # the same for a cell drawn at random
WS_HELD_CATEGORY = "warmstart/heldout_image_category_accuracy"  # pooled category prediction is right
# ROC AUC of the image's highest cell objectness for "an animal is present" (0.5: the tower cannot tell).
WS_HELD_PRESENCE_AUC = "warmstart/heldout_presence_auc"
HELD_OUT_IMAGES = 128
HIT_COVERAGE = 0.2  # a cell "lies on the animal" when the body covers at least this share of it

CATEGORY_COVERAGE = 0.3  # cells at least this covered by a body carry a category target


class WarmStartConfig(BaseModel):
    """How long and on what the vision tower is pre-trained."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1500, ge=1, description="optimiser steps, each on freshly generated images")
    batch_images: int = Field(32, ge=1, le=1024, description="images per step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak AdamW lr (linear warm-up, cosine decay to 5 %)")
    warmup_steps: int = Field(50, ge=0, description="steps of linear lr warm-up")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    easy_first_fraction: float = Field(
        0.4, ge=0.0, le=1.0, description="share of the steps over which difficulty ramps from easy to all")
    easy_range: tuple[float, float] = Field((0.2, 0.45), description="difficulty knob range of the first steps")
    hard_high: float = Field(0.9, ge=0.0, le=1.0, description="top of the difficulty range once the ramp is over")
    absent_fraction: float = Field(0.15, ge=0.0, le=1.0, description="share of images without an animal")
    image_size: int = Field(112, ge=32, le=1024, description="side of the generated images (the data set's)")
    box_weight: float = Field(2.0, ge=0.0, description="weight of the box-edge L1 loss")
    category_weight: float = Field(1.0, ge=0.0, description="weight of the category cross-entropy")
    category_start_fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="share of the steps trained on objectness and box edges alone before the category losses join")
    # Measured on this Zen 4 CPU (avx512_bf16), small model: 0.38 vs 0.51-0.56 s per 32-image step without
    # the images; a 1500-step build 812 vs 969 s. One build each, the hard-range linear probe of the tower
    # read 0.857 (bf16) vs 0.890 (fp32) ROC AUC: not adopted by the recipe until that is understood.
    bf16: bool = Field(
        False, description="bfloat16 autocast of the tower's forward and the losses (fp32 weights and optimiser)")
    seed: int = Field(0, ge=0, description="seed of the image stream and the head's initialisation")
    loader_workers: int = Field(
        0, ge=0, le=64, description="render the images in this many DataLoader worker processes, each its own "
        "stream (0: in the training loop, one stream; on 2 cores workers gained nothing, on a GPU machine the "
        "rendering is the bottleneck)")
    log_every: int = Field(25, ge=1, description="steps between progress lines")


class DenseHead(torch.nn.Module):
    """Per-token objectness, category and box-edge predictions from the merger's output."""

    def __init__(self, width: int, num_categories: int):
        super().__init__()
        self.num_categories = num_categories
        self.linear = torch.nn.Linear(width, 1 + num_categories + 4)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [N, width] → objectness logits [N], category logits [N, C], box edges [N, 4] (>= 0)."""
        out = self.linear(tokens)
        return out[:, 0], out[:, 1 : 1 + self.num_categories], torch.nn.functional.softplus(out[:, -4:])

    def category_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., width] → category logits [..., C] (the same weights as the per-cell prediction)."""
        return torch.nn.functional.linear(tokens, self.linear.weight[1 : 1 + self.num_categories],
                                          self.linear.bias[1 : 1 + self.num_categories])


def cell_targets(masks: list[np.ndarray], boxes: list[list[float]], category_index: int | None, *,
                 image_size: int, grid: int) -> dict[str, np.ndarray]:
    """Dense targets of one image on a ``grid`` × ``grid`` cell layout (row-major, like the merged tokens).

    Returns objectness [G²] (body coverage in [0, 1]), category [G²] (index, -1 = no target),
    box [G², 4] edge distances / image side and box_valid [G²] (cell centre inside a box).
    """
    cells = grid * grid
    cell = image_size / grid
    coverage = np.zeros((grid, grid), dtype=np.float32)
    if masks:
        union = np.logical_or.reduce(masks).astype(np.float32)
        edges = np.round(np.arange(grid + 1) * cell).astype(int)
        for r in range(grid):
            for c in range(grid):
                coverage[r, c] = union[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].mean()
    category = np.full(cells, -1, dtype=np.int64)
    if category_index is not None:
        category[coverage.reshape(-1) >= CATEGORY_COVERAGE] = category_index
    centres = (np.arange(grid) + 0.5) * cell
    cx, cy = np.meshgrid(centres, centres)  # [G, G], row = y
    box = np.zeros((grid, grid, 4), dtype=np.float32)
    valid = np.zeros((grid, grid), dtype=bool)
    # Where boxes overlap, the smallest box wins (its edges are the better guess for that cell).
    for x1, y1, x2, y2 in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
        box[inside] = np.stack([cx - x1, cy - y1, x2 - cx, y2 - cy], axis=-1)[inside] / image_size
        valid |= inside
    return {"objectness": coverage.reshape(-1), "category": category, "box": box.reshape(cells, 4),
            "box_valid": valid.reshape(-1)}


def difficulty_bounds(step: int, *, config: WarmStartConfig) -> tuple[float, float]:
    """The difficulty interval images of ``step`` are drawn from: easy, widening linearly to all."""
    ramp_steps = config.easy_first_fraction * config.steps
    progress = 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)
    low, high = config.easy_range
    return low, high + (max(high, config.hard_high) - high) * progress


def lr_at(step: int, *, config: WarmStartConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class ImageStream:
    """Fresh synthetic images with their dense targets, as model inputs."""

    def __init__(self, *, config: WarmStartConfig, image_processor, grid: int):
        from data.synth import CATEGORIES

        self.config, self.image_processor, self.grid = config, image_processor, grid
        self.categories = list(CATEGORIES)
        self.rng = np.random.default_rng(config.seed)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        from data.synth import generate_sample

        low, high = difficulty_bounds(step, config=self.config)
        images, targets, indices = [], [], []
        for _ in range(self.config.batch_images):
            absent = self.rng.random() < self.config.absent_fraction
            category = None if absent else self.categories[self.rng.integers(len(self.categories))]
            sample = generate_sample(self.rng, image_size=self.config.image_size,
                                     difficulty=float(self.rng.uniform(low, high)), category=category)
            index = None if sample.category is None else self.categories.index(sample.category)
            images.append(sample.image)
            indices.append(index)
            targets.append(cell_targets(sample.masks, sample.boxes, index, image_size=self.config.image_size,
                                        grid=self.grid))
        processed = self.image_processor(images=images, return_tensors="pt")
        out = {key: torch.from_numpy(np.concatenate([t[key] for t in targets])) for key in targets[0]}
        out["image_category"] = torch.tensor([-1 if index is None else index for index in indices], dtype=torch.long)
        out["pixel_values"] = processed["pixel_values"]
        out["image_grid_thw"] = processed["image_grid_thw"]
        return out


def pool_by_coverage(tokens: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Each image's tokens averaged with body-coverage weights: tokens [I·G², width], coverage [I, G²] → [I, width]."""
    pooled = (tokens.view(*coverage.shape, -1) * coverage.unsqueeze(-1)).sum(1)
    return pooled / coverage.sum(1, keepdim=True).clamp(min=1e-6)


def category_weight_at(step: int, *, config: WarmStartConfig) -> float:
    """Weight of the category losses at ``step``: 0 until ``category_start_fraction`` of the steps, then
    ``category_weight``. Why staged: from step 0 the category cross-entropy (~1.8) dominates the gradient,
    whose norm is clipped to 1, so objectness and box edges barely moved (held-out hit 0.11-0.18 after 300
    steps against 0.63-0.66 without it); once the tower finds the animal, pooling its tokens has
    something to classify. (Measured on the small model: it did not learn categories in 900 steps either;
    models/build.py has the figures.)"""
    return config.category_weight if step >= config.category_start_fraction * config.steps else 0.0


def dense_losses(head: DenseHead, tokens: torch.Tensor, batch: dict[str, torch.Tensor], *,
                 config: WarmStartConfig, category_weight: float) -> dict[str, torch.Tensor]:
    """The three losses of one batch; tokens [N, width] are the merger outputs of all its images.
    ``category_weight`` is this step's (``category_weight_at``)."""
    objectness, category, box = head(tokens)
    losses = {WS_OBJECTNESS: torch.nn.functional.binary_cross_entropy_with_logits(objectness, batch["objectness"])}
    labelled = batch["category"] >= 0
    losses[WS_CATEGORY] = (torch.nn.functional.cross_entropy(category[labelled], batch["category"][labelled])
                           if labelled.any() else tokens.sum() * 0.0)
    # Per image: its tokens averaged with body-coverage weights, classified once. A cell alone sees only
    # part of an animal; the pooled gradient reaches every token the animal covers at once.
    images = batch["image_category"].shape[0]
    pooled = pool_by_coverage(tokens, batch["objectness"].view(images, -1))
    has_category = batch["image_category"] >= 0
    losses[WS_IMAGE_CATEGORY] = (torch.nn.functional.cross_entropy(head.category_logits(pooled[has_category]),
                                                                     batch["image_category"][has_category])
                                 if has_category.any() else tokens.sum() * 0.0)
    valid = batch["box_valid"]
    losses[WS_BOX] = ((box[valid] - batch["box"][valid]).abs().mean() if valid.any() else tokens.sum() * 0.0)
    losses[WS_LOSS] = (losses[WS_OBJECTNESS] + category_weight * (losses[WS_CATEGORY] + losses[WS_IMAGE_CATEGORY])
                       + config.box_weight * losses[WS_BOX])
    with torch.no_grad():
        correct = (category[labelled].argmax(dim=-1) == batch["category"][labelled]).float()
        losses[WS_CELL_ACCURACY] = correct.mean() if labelled.any() else torch.tensor(float("nan"))
    return losses


@torch.no_grad()
def held_out_report(visual, head: DenseHead, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """How well the tower sees on held-out images: objectness hit rate (vs chance) and image category accuracy."""
    tokens = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    objectness, _, _ = head(tokens)
    images = batch["image_category"].shape[0]
    coverage = batch["objectness"].view(images, -1)
    present = batch["image_category"] >= 0
    on_animal = coverage >= HIT_COVERAGE
    best = objectness.view(images, -1).argmax(dim=1)
    hit = on_animal[torch.arange(images), best][present].float().mean()
    chance = on_animal.float().mean(dim=1)[present].mean()
    pooled = pool_by_coverage(tokens, coverage)
    correct = head.category_logits(pooled[present]).argmax(dim=-1) == batch["image_category"][present]
    return {WS_HELD_HIT: float(hit), WS_HELD_HIT_CHANCE: float(chance), WS_HELD_CATEGORY: float(correct.float().mean()),
            WS_HELD_PRESENCE_AUC: presence_auc(objectness.view(images, -1).amax(dim=1), present)}


def presence_auc(scores: torch.Tensor, present: torch.Tensor) -> float:
    """ROC AUC of ``scores`` [I] for the labels ``present`` [I] (the evaluation's ``roc_auc``); NaN without
    both labels, so the diagnostics stay floats."""
    from deploy.evaluate import roc_auc

    auc = roc_auc(scores[present].tolist(), scores[~present].tolist())
    return float("nan") if auc is None else auc


class StreamShards(torch.utils.data.IterableDataset):
    """The steps' batches rendered by DataLoader workers: worker w renders steps w, w + W, ... from its own stream
    (seed + 1000 (w + 1)), so a loader yields them in step order (difficulty follows the step)."""

    def __init__(self, *, config: WarmStartConfig, image_processor, grid: int):
        self.config, self.image_processor, self.grid = config, image_processor, grid

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        config = self.config.model_copy(update={"seed": self.config.seed + 1000 * (worker + 1)})
        stream = ImageStream(config=config, image_processor=self.image_processor, grid=self.grid)
        for step in range(worker, self.config.steps, workers):
            yield stream.batch(step)


def step_batches(config: WarmStartConfig, *, image_processor, grid: int):
    """Each step's batch, in step order: rendered in the loop (``loader_workers`` 0) or by DataLoader workers."""
    if config.loader_workers == 0:
        stream = ImageStream(config=config, image_processor=image_processor, grid=grid)
        return (stream.batch(step) for step in range(config.steps))
    shards = StreamShards(config=config, image_processor=image_processor, grid=grid)
    return iter(torch.utils.data.DataLoader(shards, batch_size=None, num_workers=config.loader_workers,
                                            prefetch_factor=4, persistent_workers=False))


def warm_start_vision(model, *, image_processor, config: WarmStartConfig,
                      progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train ``model``'s vision tower in place with the dense objective; returns the last step's losses
    and the last held-out diagnostics (``WS_HELD_*``).

    ``model`` is a ``Qwen2_5_VLForConditionalGeneration``; only ``model.model.visual`` changes. It trains on the
    device the model is on (the default build: the CPU; bench.warmstart_scale moves it to a GPU).
    """
    visual = model.model.visual
    device = next(visual.parameters()).device
    merge = visual.spatial_merge_size
    patch = image_processor.patch_size
    probe = image_processor(images=[np.zeros((config.image_size, config.image_size, 3), np.uint8)],
                            return_tensors="pt")["image_grid_thw"][0]
    if probe[1] != probe[2]:
        raise ValueError(f"warm start expects square model inputs, got grid {probe.tolist()}")
    grid = int(probe[1]) // merge
    log.info("warm start: %d steps × %d images, %d×%d image tokens per image (input %d px, patch %d)",
             config.steps, config.batch_images, grid, grid, int(probe[1]) * patch, patch)

    torch.manual_seed(config.seed)
    from data.synth import CATEGORIES

    head = DenseHead(model.config.text_config.hidden_size, len(CATEGORIES)).to(device)
    params = list(visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    held_config = config.model_copy(update={"seed": config.seed + 1, "batch_images": HELD_OUT_IMAGES,
                                            "easy_first_fraction": 0.0})
    held_out = ImageStream(config=held_config, image_processor=image_processor, grid=grid).batch(0)
    held_out = {key: value.to(device) for key, value in held_out.items()}
    visual.train()
    start, last = time.perf_counter(), {}
    for step, batch in enumerate(step_batches(config, image_processor=image_processor, grid=grid)):
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config=config)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16):
            tokens = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            losses = dense_losses(head, tokens, batch, config=config,
                                  category_weight=category_weight_at(step, config=config))
        optimizer.zero_grad(set_to_none=True)
        losses[WS_LOSS].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        last = {name: float(value.detach()) for name, value in losses.items()}
        if step % config.log_every == 0 or step == config.steps - 1:
            last.update(held_out_report(visual, head, held_out))
            elapsed = time.perf_counter() - start
            log.info("warm start step %d/%d (%.0f s, ~%.0f s left): loss %.3f objectness %.3f category %.3f "
                     "(image %.3f) box %.4f | held out: objectness hit %.2f (chance %.2f), category %.2f (chance %.2f), "
                     "presence AUC %.2f",
                     step + 1, config.steps, elapsed, elapsed / (step + 1) * (config.steps - step - 1), last[WS_LOSS],
                     last[WS_OBJECTNESS], last[WS_CATEGORY], last[WS_IMAGE_CATEGORY], last[WS_BOX], last[WS_HELD_HIT],
                     last[WS_HELD_HIT_CHANCE], last[WS_HELD_CATEGORY], 1 / head.num_categories,
                     last[WS_HELD_PRESENCE_AUC])
        if progress is not None:
            progress(step, last)  # with the held-out diagnostics on the steps that log them
    visual.eval()
    return last
