"""Importers: public camouflage benchmarks (image + binary mask folders) and COCO-style detection JSON.

Both write the shared row schema (``data.schema``). Bad inputs never stop an import: each skipped image
is counted by reason in the returned ``ImportReport`` (and logged); only a set that is mostly bad
(skipped share above ``max_bad_fraction``) fails, with ``DatasetImportError``, and then no output
file is left behind (rows are written to a temporary file that is renamed on success).

Camouflage folders (``import_camo_folder``):
  * layouts: COD10K ``Imgs/`` + ``GT/`` or ``Image/`` + ``GT_Object/``; CAMO ``Images/`` + ``GT/``;
    NC4K ``Imgs/`` + ``GT/``. ``image_dir`` / ``mask_dir`` override them (relative to ``src``).
    Images and masks are matched by file stem.
  * boxes come from the mask's connected components (8-connected, mask pixel > ``mask_threshold``).
    A component is dropped when it covers less than ``min_component_fraction`` of the image or less
    than ``min_component_relative`` of the largest component (speckle from JPEG-compressed masks and
    legs cut off from a body). Each remaining component gives one box.
  * COD10K names carry the category: ``COD10K-CAM-1-Aquatic-1-BatFish-1`` → "batfish";
    ``COD10K-NonCAM-...`` images have no object (present false; their mask may be absent).
    CAMO and NC4K names carry none: category is null.
  * difficulty "auto" labels each image with ``data.difficulty`` (computed at ``STATS_SIDE`` px, the
    scale the threshold was calibrated at); images without an object are labelled easy.
  * an image whose mask has an object but every component of it is dropped is skipped as
    ``small_object`` (``empty_mask_means_absent`` concerns masks with no object pixel at all).
COCO (``import_coco``): one "detect" row per (image, category) with all boxes of that category;
boxes ``[x, y, w, h]`` → ``[x, y, x + w, y + h]``; crowd annotations are dropped by default; a category
without a name is unknown (its annotations are dropped), and a second image entry with an id already
seen is skipped as ``duplicate_image_id``.

Every box is checked as it will be stored (scaled by ``max_side`` per axis, as float32): one narrower
than ``MIN_BOX_SIDE`` there is dropped like any degenerate box (a component, or a COCO annotation), so no
row the loader would refuse is written.

Image bytes are kept as they are when the file is JPEG or PNG (a JPEG set re-encoded as PNG would be
several times larger); other formats, and images shrunk by ``max_side``, are stored as PNG.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import find_objects, label

from data.difficulty import image_stats
from data.prompts import question_for
from data.schema import MIN_BOX_SIDE, ProgressFn, clamp_box, names_something, write_rows

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LAYOUT_DIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "cod10k": (("Imgs", "GT"), ("Image", "GT_Object")),
    "camo": (("Images", "GT"),),
    "nc4k": (("Imgs", "GT"),),
}
STATS_SIDE = 112  # longer side at which "auto" difficulty is measured (data.difficulty's calibration)
_COD10K_NAME = re.compile(r"^COD10K-(CAM|NonCAM)-\d+-[^-]+-\d+-([^-]+)-\d+$")
_KEPT_FORMATS = ("JPEG", "PNG")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetImportError(ValueError):
    """The input set cannot be imported (missing folders, unreadable JSON, mostly bad items)."""


class CamoImportConfig(BaseModel):
    """Options of ``import_camo_folder``."""

    model_config = ConfigDict(extra="forbid")

    split: str = Field(min_length=1, description="split name written into every row, e.g. train or test_hard")
    layout: Literal["cod10k", "camo", "nc4k"] = Field(
        default="cod10k", description="benchmark folder layout and naming",
    )
    image_dir: str | None = Field(
        default=None, description="image folder relative to src; null: the layout's default",
    )
    mask_dir: str | None = Field(
        default=None, description="mask folder relative to src; null: the layout's default",
    )
    mask_threshold: int = Field(
        default=127, ge=0, le=254, description="mask pixels above this (0-255) are object",
    )
    min_component_fraction: float = Field(
        default=0.0005, ge=0.0, le=1.0,
        description="drop mask components smaller than this share of the image",
    )
    min_component_relative: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="drop mask components smaller than this share of the largest component",
    )
    empty_mask_means_absent: bool = Field(
        default=False,
        description="an image whose mask is empty becomes a no-object row instead of being skipped",
    )
    difficulty: Literal["auto", "easy", "hard"] = Field(
        default="auto", description="difficulty label: measured per image, or fixed",
    )
    max_side: int | None = Field(
        default=None, ge=16,
        description="shrink images whose longer side exceeds this (boxes scaled alike); null keeps sizes",
    )
    max_bad_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fail when more than this share of images is skipped as bad",
    )


class CocoImportConfig(BaseModel):
    """Options of ``import_coco``."""

    model_config = ConfigDict(extra="forbid")

    split: str = Field(min_length=1, description="split name written into every row")
    difficulty: Literal["easy", "hard"] = Field(
        default="easy", description="difficulty label of every row (no masks to measure)",
    )
    include_crowd: bool = Field(default=False, description="keep iscrowd annotations (boxes around groups)")
    max_side: int | None = Field(
        default=None, ge=16, description="shrink images whose longer side exceeds this; null keeps sizes",
    )
    max_bad_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fail when more than this share of images is skipped as bad",
    )


@dataclass
class ImportReport:
    """What an import did. ``skipped`` counts bad images by reason (they count towards the failure
    threshold); ``notes`` counts benign events (unannotated images, dropped annotations/components)."""

    out: Path
    total: int = 0  # images seen
    rows: int = 0  # rows written
    imported: int = 0  # images that gave at least one row
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason → first names

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / self.total if self.total else 0.0

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(name)
        log.debug("skipped %s: %s", name, reason)

    def summary(self) -> str:
        return (f"{self.imported}/{self.total} images imported as {self.rows} rows into {self.out}; "
                f"skipped {dict(self.skipped)}; notes {dict(self.notes)}")


def import_camo_folder(*, src: str | os.PathLike[str], out: str | os.PathLike[str],
                       progress: ProgressFn | None = None, **options: Any) -> ImportReport:
    """Import a camouflage benchmark folder into the Parquet file ``out``.

    ``options`` are ``CamoImportConfig`` fields: ``split`` (required), ``layout`` ("cod10k", "camo"
    or "nc4k"), ``image_dir``/``mask_dir`` overrides, component thresholds, ``difficulty``, ...
    """
    config = CamoImportConfig(**options)
    image_dir, mask_dir = _resolve_dirs(Path(src), config)
    images = _image_files(image_dir)
    masks: dict[str, Path] = {}
    for path in _image_files(mask_dir):
        if path.stem not in masks or path.suffix.lower() == ".png":  # one stem, two masks: the lossless one
            masks[path.stem] = path
    report = ImportReport(out=Path(out), total=len(images))
    report.notes["orphan_mask"] = len(set(masks) - {p.stem for p in images})

    seen: set[str] = set()

    def rows() -> Iterator[dict[str, Any]]:
        for done, path in enumerate(images, start=1):
            row = None
            if path.stem in seen:  # a.jpg and a.JPG: one id, one mask
                report.skip("duplicate_id", path.name)
            else:
                seen.add(path.stem)
                row = _camo_row(path, masks.get(path.stem), config=config, report=report)
            if row is not None:
                report.imported += 1
                yield row
            if progress is not None:
                progress(done, len(images))

    return _write_checked(rows(), report=report, max_bad_fraction=config.max_bad_fraction)


def import_coco(*, annotations_json: str | os.PathLike[str], images_dir: str | os.PathLike[str],
                out: str | os.PathLike[str], progress: ProgressFn | None = None, **options: Any) -> ImportReport:
    """Import a COCO-style detection set (JSON with images, annotations, categories) into ``out``.

    ``options`` are ``CocoImportConfig`` fields: ``split`` (required), ``difficulty``, ``include_crowd``,
    ``max_side``, ``max_bad_fraction``.
    """
    config = CocoImportConfig(**options)
    try:
        coco = json.loads(Path(annotations_json).read_text())
        named = {c["id"]: str(c["name"] or "").strip().lower() for c in coco["categories"]}
        images = list(coco["images"])
        annotations = list(coco.get("annotations", []))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetImportError(
            f"annotations_json: cannot read a COCO file at {annotations_json}: {error}") from error
    # A name without a letter or digit ("", "?!") cannot be asked about, and validate_row would refuse its rows.
    categories = {key: name for key, name in named.items() if names_something(name)}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for annotation in annotations:
        if isinstance(annotation, dict) and isinstance(annotation.get("image_id", []), Hashable):
            by_image[annotation["image_id"]].append(annotation)
    report = ImportReport(out=Path(out), total=len(images))
    if len(named) > len(categories):
        report.notes["unnamed_category"] = len(named) - len(categories)
    seen: set = set()

    def rows() -> Iterator[dict[str, Any]]:
        for done, entry in enumerate(images, start=1):
            produced = list(_coco_rows(entry, by_image, categories, images_dir=Path(images_dir), config=config,
                                       report=report, seen=seen))
            if produced:
                report.imported += 1
            yield from produced
            if progress is not None:
                progress(done, len(images))

    return _write_checked(rows(), report=report, max_bad_fraction=config.max_bad_fraction)


def _resolve_dirs(src: Path, config: CamoImportConfig) -> tuple[Path, Path]:
    if config.image_dir is not None or config.mask_dir is not None:
        defaults = LAYOUT_DIRS[config.layout][0]
        candidates = ((config.image_dir or defaults[0], config.mask_dir or defaults[1]),)
    else:
        candidates = LAYOUT_DIRS[config.layout]
    for image_name, mask_name in candidates:
        if (src / image_name).is_dir() and (src / mask_name).is_dir():
            return src / image_name, src / mask_name
    tried = ", ".join(f"{i}/ + {m}/" for i, m in candidates)
    raise DatasetImportError(f"src: no image and mask folders under {src} (tried {tried}); "
                             "set image_dir and mask_dir")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _cod10k_category(stem: str) -> tuple[bool, str | None] | None:
    """(present, category) from a COD10K file stem, or None when the name does not follow COD10K."""
    match = _COD10K_NAME.match(stem)
    if match is None:
        return None
    if match.group(1) == "NonCAM":
        return False, None
    return True, match.group(2).lower()


def _camo_row(path: Path, mask_path: Path | None, *, config: CamoImportConfig,
              report: ImportReport) -> dict[str, Any] | None:
    present, category = True, None
    if config.layout == "cod10k":
        parsed = _cod10k_category(path.stem)
        if parsed is None:
            report.notes["unparsed_cod10k_name"] += 1
        else:
            present, category = parsed
    image = _load_image(path)
    if image is None:
        report.skip("corrupt_image", path.name)
        return None
    rgb, data, fmt = image
    boxes: list[list[float]] = []
    objects: list[np.ndarray] = []  # each kept component's mask
    if present:
        mask = None if mask_path is None else _load_mask(mask_path, threshold=config.mask_threshold)
        problem = ("missing_mask" if mask_path is None else "corrupt_mask" if mask is None
                   else "size_mismatch" if mask.shape != (rgb.height, rgb.width) else None)
        if problem is not None:
            report.skip(problem, path.name)
            return None
        stored = _stored_size(rgb.size, max_side=config.max_side)
        boxes, objects = _component_boxes(mask, config=config, report=report, stored=stored)
        if not boxes and mask.any():  # an object, but no component of it kept
            report.skip("small_object", path.name)
            return None
        if not boxes and not config.empty_mask_means_absent:
            report.skip("empty_mask", path.name)
            return None
        present, category = (True, category) if boxes else (False, None)
    row_image, width, height = _stored_image(rgb, data, fmt, max_side=config.max_side)
    difficulty = config.difficulty
    if difficulty == "auto":
        difficulty = _measured_difficulty(rgb, objects) if objects else "easy"
    return {
        "id": f"{config.layout}:{path.stem}",
        "image": row_image,
        "width": width,
        "height": height,
        "task": "camo",
        "question": question_for("camo"),
        "category": category,
        "boxes": boxes,
        "present": present,
        "split": config.split,
        "difficulty": difficulty,
    }


def _load_image(path: Path) -> tuple[Image.Image, bytes, str] | None:
    """(RGB image, original bytes, format) or None if the file does not decode completely. The format is ""
    for an image whose bytes must not be stored as they are (``_as_rgb``)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            rgb, rescaled = _as_rgb(image)
            return rgb, data, "" if rescaled else (image.format or "")
    except _DECODE_ERRORS:
        return None


def _as_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """(the image in RGB, whether its values were rescaled). PIL converts 16-bit grayscale (modes I;16*, and I
    holding values past 255) to RGB by clipping at 255, which turns a medical or thermal camouflage image nearly
    white, and floats (mode F) by truncating them; such values are scaled to 8 bits instead ([0, 1] floats by 255,
    [0, 255] as they are, larger by their maximum), and the image must then be stored re-encoded, since every
    reader of the stored bytes (rollout, SFT, evaluation) converts them as PIL does."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0.0) > 255.0:
            eight = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(eight).convert("RGB"), True
    if image.mode == "F":  # floats: PIL would clip them to integers, a [0, 1] image to 0 and 1
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = values.max(initial=0.0)
        scale = 255.0 if top <= 1.0 else 1.0 if top <= 255.0 else 255.0 / top
        eight = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight).convert("RGB"), True
    return image.convert("RGB"), False


def _load_mask(path: Path, *, threshold: int) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > threshold
    except _DECODE_ERRORS:
        return None


def _component_boxes(mask: np.ndarray, *, config: CamoImportConfig, report: ImportReport,
                     stored: tuple[int, int]) -> tuple[list[list[float]], list[np.ndarray]]:
    """Pixel-edge boxes of the kept components as stored (an image ``stored`` = (width, height) in size),
    largest first, and the mask of each (in the mask's pixels)."""
    labels, count = label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return [], []
    areas = np.bincount(labels.ravel())[1:]
    minimum = max(config.min_component_fraction * mask.size, config.min_component_relative * areas.max())
    extents = find_objects(labels)  # per label: the (row slice, column slice) of its bounding box
    kept, boxes = [], []
    for k in np.argsort(-areas, kind="stable").tolist():
        if areas[k] < minimum:
            continue
        rows, cols = extents[k]
        box = _stored_box([float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)],
                          source=(mask.shape[1], mask.shape[0]), stored=stored)
        if box is not None:  # (a thin leg under a pixel once shrunk is widened to one, not dropped)
            kept.append(k + 1)
            boxes.append(box)
    report.notes["dropped_component"] += count - len(kept)
    return boxes, [labels == k for k in kept]


def _stored_size(size: tuple[int, int], *, max_side: int | None) -> tuple[int, int]:
    """(width, height) an image of ``size`` is stored at: shrunk so its longer side is ``max_side``."""
    width, height = size
    if max_side is None or max(size) <= max_side:
        return width, height
    scale = max_side / max(size)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _stored_image(image: Image.Image, data: bytes, fmt: str, *, max_side: int | None) -> tuple[bytes, int, int]:
    """(bytes to store, width, height)."""
    size = _stored_size(image.size, max_side=max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
        return _png(image), image.width, image.height
    if fmt in _KEPT_FORMATS:
        return data, image.width, image.height
    return _png(image), image.width, image.height


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _stored_box(box: list[float], *, source: tuple[int, int], stored: tuple[int, int]) -> list[float] | None:
    """``box`` (pixels of an image of ``source`` size) as stored: clamped, scaled per axis to the ``stored`` size
    (each side is rounded apart when shrinking), in float32 as Parquet holds it. None where it encloses nothing
    of the source image; a real box that shrinking leaves under ``MIN_BOX_SIDE`` (a pole, a leg) is widened to
    it, so that no object is lost (the loader refuses boxes under that size)."""
    x1, y1, x2, y2 = clamp_box(list(box), width=source[0], height=source[1])
    if x2 <= x1 or y2 <= y1:
        return None
    sx, sy = stored[0] / source[0], stored[1] / source[1]
    x1, x2 = _at_least_min_side(x1 * sx, x2 * sx, limit=stored[0])
    y1, y2 = _at_least_min_side(y1 * sy, y2 * sy, limit=stored[1])
    return [x1, y1, x2, y2]


def _at_least_min_side(low: float, high: float, *, limit: int) -> tuple[float, float]:
    """[low, high] in float32, widened about its centre to MIN_BOX_SIDE where narrower, kept within [0, limit]."""
    low32, high32 = np.float32(low), np.float32(high)
    if float(high32) - float(low32) >= MIN_BOX_SIDE:
        return float(low32), float(high32)
    side = min(MIN_BOX_SIDE, float(limit))
    low = min(max(0.0, (low + high - side) / 2), limit - side)
    low32, high32 = np.float32(low), np.float32(low + side)
    while float(high32) - float(low32) < side:  # float32 rounding may take a hair off the side
        high32 = np.nextafter(high32, np.float32(np.inf))
    return float(low32), float(high32)


def _measured_difficulty(image: Image.Image, masks: list[np.ndarray]) -> str:
    """The image's difficulty by its best-separable object (``data.difficulty.image_stats``), each kept component
    measured as an object of its own, as it is boxed: one plain animal beside a hidden one makes the image easy."""
    scale = min(1.0, STATS_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    resized = [np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.Resampling.BOX)) >= 0.5
               for m in masks]
    stats = image_stats(small, resized)
    return "easy" if stats is None else stats.difficulty


def _coco_rows(entry: Any, by_image: dict[Any, list[dict]], categories: dict[Any, str], *, images_dir: Path,
               config: CocoImportConfig, report: ImportReport, seen: set) -> Iterator[dict[str, Any]]:
    try:
        image_id, file_name = entry["id"], str(entry["file_name"])
        hash(image_id)  # a JSON list or object cannot identify an image
        declared = (int(entry["width"]), int(entry["height"])) if "width" in entry and "height" in entry else None
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
        report.skip("bad_image_entry", repr(entry)[:80])
        return
    if str(image_id) in seen:  # its rows' ids would repeat the first entry's (1 and "1" alike: coco:1:cat)
        report.skip("duplicate_image_id", file_name)
        return
    seen.add(str(image_id))
    path = images_dir / file_name
    if not path.is_file():
        report.skip("missing_image", file_name)
        return
    loaded = _load_image(path)
    if loaded is None:
        report.skip("corrupt_image", file_name)
        return
    rgb, data, fmt = loaded
    if declared is not None and declared != rgb.size:
        report.skip("size_mismatch", file_name)
        return
    stored = _stored_size(rgb.size, max_side=config.max_side)
    boxes_by_category: dict[str, list[list[float]]] = defaultdict(list)
    incomplete: set[str] = set()  # categories with an annotation that could not be kept
    for annotation in by_image.get(image_id, []):
        category, box, dropped = _coco_box(annotation, categories, config=config, source=rgb.size, stored=stored)
        if dropped is not None:
            report.notes[f"annotation_{dropped}"] += 1
            if category is not None:
                incomplete.add(category)
        else:
            boxes_by_category[category].append(box)
    for category in sorted(incomplete & boxes_by_category.keys()):
        # "Find every <category>" with one of them (a crowd, a broken box) left out would teach a wrong count: the
        # schema's box rule makes such a row invalid rather than drop the box.
        del boxes_by_category[category]
        report.notes["row_incomplete"] += 1
    if not boxes_by_category:
        report.notes["no_annotations"] += 1
        return
    row_image, width, height = _stored_image(rgb, data, fmt, max_side=config.max_side)
    for category in sorted(boxes_by_category):
        yield {
            "id": f"coco:{image_id}:{category}",
            "image": row_image,
            "width": width,
            "height": height,
            "task": "detect",
            "question": question_for("detect", category=category),
            "category": category,
            "boxes": boxes_by_category[category],
            "present": True,
            "split": config.split,
            "difficulty": config.difficulty,
        }


def _coco_box(annotation: dict, categories: dict[Any, str], *, config: CocoImportConfig, source: tuple[int, int],
              stored: tuple[int, int]) -> tuple[str | None, list[float] | None, str | None]:
    """(category, [x1, y1, x2, y2] as stored, None), or (its category if known, None, why it is dropped)."""
    category_id = annotation.get("category_id")
    if not isinstance(category_id, Hashable) or category_id not in categories:
        return None, None, "unknown_category"
    category = categories[category_id]
    if annotation.get("iscrowd") and not config.include_crowd:
        return category, None, "crowd"
    bbox = annotation.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return category, None, "bad_box"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return category, None, "bad_box"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return category, None, "bad_box"
    box = _stored_box([x, y, x + w, y + h], source=source, stored=stored)
    if box is None:
        return category, None, "bad_box"
    return category, box, None


def _write_checked(rows: Iterator[dict[str, Any]], *, report: ImportReport,
                   max_bad_fraction: float) -> ImportReport:
    """Write rows to a temporary file; keep it as ``report.out`` only if the set is not mostly bad."""
    report.out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".parquet.partial", dir=report.out.parent)
    os.close(handle)
    try:
        report.rows = write_rows(rows, temporary)
        if report.total == 0:
            raise DatasetImportError("no images found to import")
        if report.bad_fraction > max_bad_fraction:
            raise DatasetImportError(
                f"{report.bad_fraction:.0%} of {report.total} images are bad (more than max_bad_fraction "
                f"{max_bad_fraction:.0%}): {dict(report.skipped)}; first examples: {dict(report.examples)}")
        os.replace(temporary, report.out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    log.info("import: %s", report.summary())
    if report.skipped:
        log.warning("import skipped %d bad images: %s", sum(report.skipped.values()), dict(report.skipped))
    return report

