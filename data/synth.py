"""Synthetic camouflaged-object data set: textured scenes with hidden animals, written as Parquet.

One knob, ``difficulty`` d in [0, 1], sets how well an object blends in (t = 1 - d is conspicuity):
  * texture: the object is cut from the background's own material (the scene turned by 180°), mixed
    with a foreign palette at weight 0.6 t² and overlaid with its own stripes of amplitude 0.3 t²
    (hard objects keep almost none of either);
  * colour: brightness shifted by 11 % + 20 % t, hue tinted by up to 8 % t;
  * edges: the body mask is blurred with sigma 0.4 + 0.8 d pixels (at 112 px) and casts a soft shadow
    of strength 0.22 + 0.2 t;
  * recognisability floor: a top-left lighting gradient (14 % + 6 % t) and darker markings (eyes, wing
    bands, midribs; 20 % + 20 % t) remain at every difficulty, so a careful look finds the animal;
  * size: the animal's radius is 30 % (d = 0) down to 18 % (d = 1) of the image side, +-15 %
    (times 0.75 when an image holds several).
Easy images draw d from ``easy_range``, hard ones from ``hard_range``. ``data.difficulty`` measures
the result independently (colour and texture distance between object and surroundings).

Files written to ``out_dir``: one ``<split>.parquet`` per entry of ``splits`` (by default
train.parquet with mixed difficulty, test_easy.parquet all easy, test_hard.parquet all hard) and
``contact_sheet.png`` (the first images of every split with their ground-truth boxes).
Every image has its own generator seeded by (seed, split index, image index), so a seed always
gives byte-identical files.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.ndimage import gaussian_filter

from data.contact_sheet import draw_contact_sheet
from data.prompts import question_for
from data.schema import ProgressFn, write_rows
from data.shapes import CATEGORIES, draw_animal
from data.textures import BIOMES, foreign_material, render_biome

__all__ = ["CATEGORIES", "SplitSpec", "SynthConfig", "SynthReport", "Sample", "generate_sample",
           "synthesize", "write_dataset"]

log = logging.getLogger(__name__)

SYNTH_CONFIG_FILE = "synth_config.json"  # the SynthConfig a directory's set was generated with

PNG_COMPRESS_LEVEL = 1  # fixed (byte-identical files per seed); level 1: noisy images barely shrink further
CONTACT_SHEET_COLUMNS = 8
_REFERENCE_SIZE = 112.0  # edge blur and shadow offsets are specified at this image size


class SplitSpec(BaseModel):
    """One output split: its share of the images and its share of hard images."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="split name: the row's split and the file stem")
    fraction: float = Field(gt=0.0, le=1.0, description="share of all n images that go to this split")
    hard_fraction: float | None = Field(
        default=None, ge=0.0, le=1.0, description="share of hard images here; null: the config's hard_fraction"
    )


DEFAULT_SPLITS = (
    SplitSpec(name="train", fraction=0.8),
    SplitSpec(name="test_easy", fraction=0.1, hard_fraction=0.0),
    SplitSpec(name="test_hard", fraction=0.1, hard_fraction=1.0),
)


class SynthConfig(BaseModel):
    """Everything that determines a synthetic data set (same config → byte-identical files)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(ge=0, description="master seed; every image derives its own generator from it")
    n: int = Field(ge=1, le=10_000_000, description="total number of images over all splits")
    image_size: int = Field(default=112, ge=32, le=1024, description="side of the square images in pixels")
    hard_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="share of hard images in splits that do not set their own",
    )
    absent_fraction: float = Field(
        default=0.15, ge=0.0, le=1.0, description="share of images with no object (present = false)",
    )
    max_objects: int = Field(
        default=1, ge=1, le=4,
        description="objects per present image are drawn uniformly from 1..max_objects (one category per image)",
    )
    easy_range: tuple[float, float] = Field(
        default=(0.2, 0.45), description="difficulty knob interval of easy images",
    )
    hard_range: tuple[float, float] = Field(
        default=(0.6, 0.9), description="difficulty knob interval of hard images",
    )
    splits: tuple[SplitSpec, ...] = Field(
        default=DEFAULT_SPLITS, min_length=1, description="output splits; fractions must sum to 1",
    )

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        for name, (low, high) in (("easy_range", self.easy_range), ("hard_range", self.hard_range)):
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name}: need 0 <= low <= high <= 1, got ({low}, {high})")
        if self.easy_range[1] > self.hard_range[0]:
            raise ValueError("easy_range and hard_range: easy must lie below hard (easy high <= hard low)")
        names = [s.name for s in self.splits]
        if len(set(names)) != len(names):
            raise ValueError(f"splits: names must be unique, got {names}")
        total = sum(s.fraction for s in self.splits)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"splits: fractions must sum to 1, got {total}")
        return self


@dataclass
class Sample:
    """One generated image with its ground truth (before encoding)."""

    image: np.ndarray  # uint8 (size, size, 3)
    category: str | None
    boxes: list[list[float]]  # pixel-edge [x1, y1, x2, y2] of each object's body mask
    masks: list[np.ndarray]  # bool (size, size) body mask (coverage >= 0.5) of each object
    difficulty: float  # the knob value d in [0, 1]
    biome: str


@dataclass
class SynthReport:
    """What ``synthesize`` wrote."""

    out_dir: Path
    files: dict[str, Path]  # split name → Parquet path
    counts: dict[str, int]  # split name → rows
    contact_sheet: Path
    seconds: float
    per_split_absent: dict[str, int] = field(default_factory=dict)


def generate_sample(rng: np.random.Generator, *, image_size: int, difficulty: float,
                    category: str | None, n_objects: int = 1) -> Sample:
    """Render one scene; ``category`` None gives an empty scene. Pure function of ``rng``'s state."""
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty: expected a value in [0, 1], got {difficulty}")
    biome = BIOMES[rng.integers(len(BIOMES))]
    scene = render_biome(biome, rng, image_size)
    # Another patch of the same material with the same grain direction, taken before any animal is
    # drawn so that no animal is cut from another one.
    material = scene[::-1, ::-1].copy()
    boxes: list[list[float]] = []
    masks: list[np.ndarray] = []
    if category is not None:
        for center, radius in _place(rng, image_size=image_size, difficulty=difficulty, n_objects=n_objects):
            scene, mask = _composite(rng, scene, material, biome=biome, category=category, center=center,
                                     radius=radius, difficulty=difficulty)
            if mask.any():
                masks.append(mask)
                boxes.append(mask_box(mask))
    grain = rng.normal(0.0, 0.012, scene.shape).astype(np.float32)  # sensor noise unifies both layers
    image = (np.clip(scene + grain, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Sample(image=image, category=category if boxes else None, boxes=boxes, masks=masks,
                  difficulty=difficulty, biome=biome)


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight pixel-edge box [x1, y1, x2, y2] of a non-empty boolean mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _place(rng: np.random.Generator, *, image_size: int, difficulty: float,
           n_objects: int) -> list[tuple[tuple[float, float], float]]:
    """Centres and radii of non-overlapping animals that lie fully inside the image."""
    radius_fraction = (0.30 - 0.12 * difficulty) * (0.75 if n_objects > 1 else 1.0)
    placed: list[tuple[tuple[float, float], float]] = []
    for _ in range(n_objects):
        radius = radius_fraction * image_size * rng.uniform(0.85, 1.15)
        for _attempt in range(20):
            center = (float(rng.uniform(radius, image_size - radius)),
                      float(rng.uniform(radius, image_size - radius)))
            if all(math.dist(center, c) > radius + r for c, r in placed):
                placed.append((center, radius))
                break
    return placed


def _composite(rng: np.random.Generator, scene: np.ndarray, material: np.ndarray, *, biome: str, category: str,
               center: tuple[float, float], radius: float, difficulty: float) -> tuple[np.ndarray, np.ndarray]:
    size = scene.shape[0]
    conspicuity = 1.0 - difficulty
    aspect = rng.uniform(0.9, 1.0)  # below 1 so the animal never leaves its placement circle
    body, marks = draw_animal(category, size=size, center=center, radius=radius,
                              angle=rng.uniform(0, 2 * math.pi), aspect=aspect)
    # Texture: the surroundings' own material. Easy objects mix in a foreign material and carry their
    # own stripes; both fade with the square of conspicuity, so hard objects keep almost none.
    texture = material
    other = BIOMES[(BIOMES.index(biome) + 1 + rng.integers(len(BIOMES) - 1)) % len(BIOMES)]
    foreign = 0.6 * conspicuity**2
    texture = (1 - foreign) * texture + foreign * foreign_material(other, rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stripe_angle, stripe_period = rng.uniform(0, math.pi), rng.uniform(0.25, 0.45) * radius
    stripes = np.sin((xx * math.cos(stripe_angle) + yy * math.sin(stripe_angle)) * (2 * math.pi / stripe_period))
    texture = texture * (1.0 + 0.3 * conspicuity**2 * stripes)[..., None]
    # Colour: brightness and hue shift that shrink with difficulty but never vanish.
    gain = 1.0 + rng.choice([-1.0, 1.0]) * (0.11 + 0.2 * conspicuity)
    tint = rng.normal(0.0, 1.0, 3).astype(np.float32)
    tint *= 0.08 * conspicuity / max(float(np.linalg.norm(tint)), 1e-6)
    texture = texture * gain + tint
    # Shading: light from the top left gives the body volume at any difficulty.
    light = ((center[0] - xx) + (center[1] - yy)) / (2.0 * radius)
    texture = texture * (1.0 + (0.14 + 0.06 * conspicuity) * np.clip(light, -1, 1))[..., None]
    texture = texture * (1.0 - (0.2 + 0.2 * conspicuity) * marks)[..., None]
    # Edges and shadow, specified at 112 px and scaled with the image.
    unit = size / _REFERENCE_SIZE
    alpha = gaussian_filter(body, sigma=(0.4 + 0.8 * difficulty) * unit)
    shadow = gaussian_filter(_shifted(body, max(1, round(1.5 * unit))), sigma=2.0 * unit)
    scene = scene * (1.0 - (0.22 + 0.2 * conspicuity) * shadow)[..., None]
    scene = scene * (1.0 - alpha[..., None]) + np.clip(texture, 0.0, 1.0) * alpha[..., None]
    return scene, body >= 0.5


def _shifted(mask: np.ndarray, offset: int) -> np.ndarray:
    """``mask`` moved ``offset`` pixels right and down, zero-filled (where a shadow falls)."""
    out = np.zeros_like(mask)
    out[offset:, offset:] = mask[:-offset, :-offset]
    return out


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB array, with fixed settings and no metadata chunks."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL,
                                            optimize=False)
    return buffer.getvalue()


def synthesize(*, out_dir: str | os.PathLike[str], seed: int, n: int, progress: ProgressFn | None = None,
               **options) -> SynthReport:
    """Generate and write a data set; ``options`` are the other ``SynthConfig`` fields.

    Example: ``synthesize(out_dir="runs/data", seed=0, n=1000, hard_fraction=0.3)``.
    """
    return write_dataset(SynthConfig(seed=seed, n=n, **options), out_dir=out_dir, progress=progress)


def write_dataset(config: SynthConfig, *, out_dir: str | os.PathLike[str],
                  progress: ProgressFn | None = None) -> SynthReport:
    """Generate the data set described by ``config`` into ``out_dir`` (created if missing)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = _split_counts(config)
    files: dict[str, Path] = {}
    absent: Counter[str] = Counter()
    sheet_rows: list[dict] = []
    done = 0

    def tracked(split_index: int, name: str):
        """The split's rows, streamed to Parquet (a large n never sits in memory) while counting."""
        nonlocal done
        for i, row in enumerate(_split_rows(config, split_index=split_index, count=counts[name])):
            absent[name] += not row["present"]
            if i < CONTACT_SHEET_COLUMNS:
                sheet_rows.append(row)
            done += 1
            if progress is not None:
                progress(done, config.n)
            yield row

    # Every split is written aside and renamed into place only once all are whole: an interrupted synthesis left
    # a valid train.parquet of the rows written so far, which the next run took for the set (data.synth makes a
    # set only where train.parquet is missing) and trained on, without a test split to evaluate it.
    partial = {}
    for split_index, spec in enumerate(config.splits):
        files[spec.name] = out / f"{spec.name}.parquet"
        partial[spec.name] = out / f"{spec.name}.parquet.partial"
        write_rows(tracked(split_index, spec.name), partial[spec.name])
    for name, path in partial.items():
        os.replace(path, files[name])
    sheet = out / "contact_sheet.png"
    draw_contact_sheet(sheet_rows, out_path=sheet, columns=CONTACT_SHEET_COLUMNS)
    (out / SYNTH_CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    report = SynthReport(out_dir=out, files=files, counts=counts, contact_sheet=sheet,
                         seconds=time.perf_counter() - start, per_split_absent=dict(absent))
    log.info("synthesized %d images into %s in %.1f s: %s", config.n, out, report.seconds, counts)
    return report


def _split_counts(config: SynthConfig) -> dict[str, int]:
    """Images per split: largest-remainder rounding so that the counts add up to exactly n."""
    exact = [s.fraction * config.n for s in config.splits]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: config.n - sum(counts)]:
        counts[i] += 1
    return {s.name: c for s, c in zip(config.splits, counts)}


def _exact_flags(rng: np.random.Generator, count: int, fraction: float) -> np.ndarray:
    """``round(fraction * count)`` True values in random order: shares hit the knob exactly."""
    flags = np.zeros(count, dtype=bool)
    flags[: round(fraction * count)] = True
    rng.shuffle(flags)
    return flags


def _split_rows(config: SynthConfig, *, split_index: int, count: int):
    spec = config.splits[split_index]
    plan_rng = np.random.default_rng([config.seed, split_index, 0])
    hard_fraction = config.hard_fraction if spec.hard_fraction is None else spec.hard_fraction
    hard = _exact_flags(plan_rng, count, hard_fraction)
    absent = _exact_flags(plan_rng, count, config.absent_fraction)
    # Categories cycle over the present images so every category appears once there are enough.
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(int((~absent).sum()))]
    plan_rng.shuffle(categories)
    category_iter = iter(categories)
    question = question_for("camo", categories=CATEGORIES)
    for i in range(count):
        rng = np.random.default_rng([config.seed, split_index, 1, i])
        low, high = config.hard_range if hard[i] else config.easy_range
        n_objects = int(rng.integers(1, config.max_objects + 1))
        sample = generate_sample(rng, image_size=config.image_size, difficulty=float(rng.uniform(low, high)),
                                 category=None if absent[i] else next(category_iter), n_objects=n_objects)
        yield {
            "id": f"synth-{config.seed}-{spec.name}-{i:06d}",
            "image": encode_png(sample.image),
            "width": config.image_size,
            "height": config.image_size,
            "task": "camo",
            "question": question,
            "category": sample.category,
            "boxes": sample.boxes,
            "present": bool(sample.boxes),
            "split": spec.name,
            "difficulty": "hard" if hard[i] else "easy",
        }

