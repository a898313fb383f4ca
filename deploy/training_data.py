"""The training set of a run: make it if asked, read it, count and skip bad rows, issue prompt groups.

Bad rows never crash a run: each is counted by reason (``data.schema.validate_row`` names the field)
and skipped; boxes overhanging the image are clamped by the schema's one rule. A data set that is
mostly bad fails fast with the counts, before any actor starts.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from actors.types import PromptGroup, Target
from curriculum.sampler import PromptMeta
from data.schema import clamp_row, iter_rows, validate_row

log = logging.getLogger(__name__)


class BadDatasetError(ValueError):
    """Too many unusable rows to train on."""


@dataclass
class TrainingData:
    rows: dict[str, dict]  # id → clamped, valid row
    bad_rows: Counter  # reason → rows skipped
    path: Path
    mirror: bool = False  # every other prompt group (odd issues) mirrored left-right (``data.rl_mirror``)

    @property
    def prompt_table(self) -> list[PromptMeta]:
        return [PromptMeta(id=i, task=r["task"], difficulty=r["difficulty"]) for i, r in self.rows.items()]

    def prompt_group(self, row_id: str, *, issue: int, stage: int) -> PromptGroup:
        """The unit of rollout work for one draw of ``row_id`` (``issue`` makes the group id unique); with
        ``mirror``, odd issues show the image mirrored left-right with its boxes mirrored alike."""
        row = self.rows[row_id]
        image, boxes = row["image"], [list(map(float, b)) for b in row["boxes"]]
        if self.mirror and issue % 2:
            image, boxes = mirrored(image, boxes, width=int(row["width"]))
        return PromptGroup(
            group_id=f"{row_id}#{issue}",
            prompt_id=row_id,
            task=row["task"],
            difficulty=row["difficulty"],
            question=row["question"],
            image=image,
            target=Target(
                present=bool(row["present"]),
                category=row["category"],
                boxes=boxes,
                width=int(row["width"]),
                height=int(row["height"]),
            ),
            stage=stage,
        )


def mirrored(image: bytes, boxes: list[list[float]], *, width: int) -> tuple[bytes, list[list[float]]]:
    """``image`` mirrored left-right (PNG) and ``boxes`` ([x1, y1, x2, y2] pixels) in the mirrored frame:
    x → width − x. Bytes that do not decode are returned as they are (the rollout counts and skips them)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as decoded:
            flipped = ImageOps.mirror(decoded.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError):
        return image, boxes
    out = io.BytesIO()
    flipped.save(out, format="PNG")
    return out.getvalue(), [[width - x2, y1, width - x1, y2] for x1, y1, x2, y2 in boxes]


def _reason(problem: str) -> str:
    """'boxes[0]: zero area' → 'boxes' (the field alone: metric labels must stay few)."""
    return problem.split(":", 1)[0].split("[", 1)[0].strip() or "row"


def prepare_training_data(config) -> TrainingData:
    """The training split of a run's ``DataConfig``: synthesised first when missing (and ``synth`` is on),
    then read; with ``train_difficulty`` only rows of that difficulty, with ``train_limit`` only the first valid
    ones of those (the few-shot setting)."""
    split_file = Path(config.path) / f"{config.train_split}.parquet"
    if not split_file.exists() and config.synth:
        from data.synth import synthesize

        log.info("generating the synthetic data set in %s (%d images)", config.path, config.synth_n)
        synthesize(out_dir=config.path, seed=config.synth_seed, n=config.synth_n)
    else:
        warn_if_another_synthetic_set(config)
    data = load_training_data(split_file, max_bad_fraction=config.max_bad_fraction, limit=config.train_limit,
                              difficulty=config.train_difficulty)
    data.mirror = config.rl_mirror
    return data


def warn_if_another_synthetic_set(config) -> None:
    """A set already in ``data.path`` is used as it is; say so when it was generated with another seed or size
    than ``data.synth_seed`` / ``data.synth_n`` ask (they apply only to a set that is missing)."""
    from data.synth import SYNTH_CONFIG_FILE

    record = Path(config.path) / SYNTH_CONFIG_FILE
    if not config.synth or not record.is_file():
        return
    made = json.loads(record.read_text())
    if (made.get("seed"), made.get("n")) != (config.synth_seed, config.synth_n):
        log.warning("data.path %s holds a synthetic set of seed %s and %s images, not data.synth_seed=%d and "
                    "data.synth_n=%d: it is used as it is (set another data.path for a new set)", config.path,
                    made.get("seed"), made.get("n"), config.synth_seed, config.synth_n)


def load_training_data(path: str | Path, *, max_bad_fraction: float, limit: int | None = None,
                       difficulty: str | None = None) -> TrainingData:
    """Read a Parquet split, keeping valid rows (clamped) and counting the rest by field.

    ``difficulty``: keep only valid rows of this difficulty ("easy" / "hard"); the others are neither kept nor bad.
    ``limit``: keep only the first ``limit`` of the rows kept (file order); bad rows are still counted in full.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no Parquet file at {path}")
    rows: dict[str, dict] = {}
    bad: Counter = Counter()
    total = 0
    try:
        for row in iter_rows(path):
            total += 1
            problems = validate_row(row)
            if not problems and row["id"] in rows:
                problems = [f"id: duplicate {row['id']!r}"]
            if problems:
                bad[_reason(problems[0])] += 1
                log.warning("skipping row %r: %s", row.get("id") if isinstance(row, dict) else None, "; ".join(problems))
                continue
            if (difficulty is None or row["difficulty"] == difficulty) and (limit is None or len(rows) < limit):
                rows[row["id"]] = clamp_row(row)
    except (OSError, ValueError) as e:  # pyarrow raises these for unreadable files or wrong column types
        raise BadDatasetError(f"data: cannot read {path}: {e}") from e
    n_bad = sum(bad.values())
    if total == 0 or not rows:
        which = "usable rows" if difficulty is None else f"usable rows of difficulty {difficulty!r}"
        raise BadDatasetError(f"data: {path} has no {which} ({total} rows, bad: {dict(bad)})")
    if n_bad / total > max_bad_fraction:
        raise BadDatasetError(
            f"data: {n_bad} of {total} rows in {path} are unusable (more than "
            f"data.max_bad_fraction={max_bad_fraction}); by field: {dict(bad)}"
        )
    if n_bad:
        log.warning("data: skipped %d of %d rows in %s: %s", n_bad, total, path, dict(bad))
    return TrainingData(rows=rows, bad_rows=bad, path=path)
