"""Synthetic camouflage set: determinism, schema, split/absent/category shares, tight boxes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from data.contact_sheet import sheet_size
from data.schema import ROW_SCHEMA, read_rows, validate_row
from data.shapes import draw_animal
from data.synth import CATEGORIES, SplitSpec, SynthConfig, generate_sample, mask_box, synthesize

FILES = ("train.parquet", "test_easy.parquet", "test_hard.parquet", "contact_sheet.png")


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize(out_dir=tmp_path / name, seed=seed, n=20)
    for file in FILES:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
        assert (tmp_path / "a" / file).read_bytes() != (tmp_path / "c" / file).read_bytes(), file


def test_files_follow_the_row_schema_and_every_row_validates(synth_set):
    for split, path in synth_set.files.items():
        assert pq.read_schema(path).equals(ROW_SCHEMA)
        for row in read_rows(path):
            assert validate_row(row) == [], row["id"]
            assert row["split"] == split and row["task"] == "camo" and (row["width"], row["height"]) == (112, 112)
            assert row["present"] == bool(row["boxes"]) == (row["category"] is not None)
            assert row["category"] is None or row["category"] in CATEGORIES


def test_split_sizes_and_difficulties_follow_the_config(synth_set):
    assert synth_set.counts == {"train": 96, "test_easy": 12, "test_hard": 12}
    difficulty = {split: [r["difficulty"] for r in read_rows(path)] for split, path in synth_set.files.items()}
    assert set(difficulty["test_easy"]) == {"easy"} and set(difficulty["test_hard"]) == {"hard"}
    assert difficulty["train"].count("hard") == 48  # hard_fraction 0.5 of 96, exactly


def test_every_category_appears_and_absent_share_matches_the_knob(synth_set):
    rows = [r for path in synth_set.files.values() for r in read_rows(path)]
    assert {r["category"] for r in rows if r["present"]} == set(CATEGORIES)
    absent = sum(not r["present"] for r in rows)
    assert absent == round(0.15 * 96) + 2 * round(0.15 * 12)  # exact per split: 14 + 2 + 2
    assert abs(absent / len(rows) - 0.15) < 0.02


def test_contact_sheet_has_eight_images_of_each_split(synth_set):
    with Image.open(synth_set.contact_sheet) as sheet:
        assert sheet.size == sheet_size(24, columns=8, tile=224, with_predictions=False) == (1792, 708)


@pytest.mark.parametrize("category", CATEGORIES)
def test_boxes_are_the_tight_box_of_the_mask(category):
    sample = generate_sample(np.random.default_rng(3), image_size=112, difficulty=0.5, category=category)
    assert sample.category == category and len(sample.boxes) == len(sample.masks) == 1
    mask = sample.masks[0]
    x1, y1, x2, y2 = (int(v) for v in sample.boxes[0])
    assert mask[y1:y2, x1:x2].sum() == mask.sum()  # the box holds the whole mask ...
    assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()  # ... and touches it on all four sides
    assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
    assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112
    assert mask.sum() > 60  # a real animal, not a speck


def test_mask_box_uses_pixel_edges():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == [3.0, 2.0, 9.0, 5.0]


def test_empty_scene_has_no_object():
    sample = generate_sample(np.random.default_rng(0), image_size=64, difficulty=0.9, category=None)
    assert sample.category is None and sample.boxes == [] and sample.image.shape == (64, 64, 3)


def test_several_objects_per_image_share_one_category(tmp_path):
    report = synthesize(out_dir=tmp_path, seed=2, n=30, max_objects=3, absent_fraction=0.0,
                        splits=[SplitSpec(name="train", fraction=1.0)])
    rows = read_rows(report.files["train"])
    counts = [len(r["boxes"]) for r in rows]
    assert max(counts) > 1 and min(counts) >= 1 and max(counts) <= 3
    for row in rows:
        assert validate_row(row) == []


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"splits": [{"name": "train", "fraction": 0.5}]}, "fractions must sum to 1"),
        ({"splits": [{"name": "a", "fraction": 0.5}, {"name": "a", "fraction": 0.5}]}, "names must be unique"),
        ({"splits": [{"name": "Bad Name", "fraction": 1.0}]}, "splits.0.name"),
        ({"easy_range": (0.2, 0.8)}, "easy must lie below hard"),
        ({"hard_range": (0.9, 0.7)}, "hard_range: need 0 <= low <= high <= 1"),
        ({"absent_fraction": 1.5}, "absent_fraction"),
        ({"sed": 3}, "sed"),
    ],
)
def test_bad_configs_fail_naming_the_field(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SynthConfig(seed=0, n=10, **fields)


def test_progress_is_reported_per_image(tmp_path):
    seen = []
    synthesize(out_dir=tmp_path, seed=0, n=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_an_interrupted_synthesis_leaves_no_split_a_run_would_take_for_the_set(tmp_path):
    """Killed at image 30 of 40: train.parquet held the rows written so far, a valid file that the next run took
    for the whole set (it synthesises only where train.parquet is missing), with no test split."""
    from data.synth import SYNTH_CONFIG_FILE

    def stop_at_30(done: int, total: int) -> None:
        if done == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize(out_dir=tmp_path, seed=0, n=40, progress=stop_at_30)
    assert not list(tmp_path.glob("*.parquet")) and not (tmp_path / SYNTH_CONFIG_FILE).exists()
    report = synthesize(out_dir=tmp_path, seed=0, n=40)  # the next run makes the whole set
    assert sum(len(read_rows(path)) for path in report.files.values()) == 40
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("category", CATEGORIES)
def test_animals_stay_inside_their_placement_circle(category):
    for angle in np.linspace(0, 2 * np.pi, 7):
        body, marks = draw_animal(category, size=112, center=(56.0, 56.0), radius=30.0, angle=angle, aspect=0.95)
        rows, cols = np.nonzero(body > 0)
        assert np.hypot(rows + 0.5 - 56, cols + 0.5 - 56).max() <= 30.0 + 1.0
        assert (body >= 0.5).sum() > 200 and (marks <= body + 1e-6).all()


def test_silhouettes_are_distinct():
    masks = {c: draw_animal(c, size=112, center=(56.0, 56.0), radius=40.0, angle=0.0)[0] >= 0.5 for c in CATEGORIES}
    for a in CATEGORIES:
        for b in CATEGORIES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.6, (a, b, iou)
