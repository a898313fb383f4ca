"""Importers on small fixture folders written here: COD10K/CAMO layouts and COCO JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from data.importers import DatasetImportError, import_camo_folder, import_coco
from data.schema import read_rows, validate_row

W, H = 64, 48


def _jpeg(path: Path, size=(W, H), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 200, (size[1], size[0], 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _mask(path: Path, rects, size=(W, H)) -> None:
    """A 0/255 PNG mask with the given filled (x1, y1, x2, y2) pixel-edge rectangles."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x1, y1, x2, y2 in rects:
        mask[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def _corrupt(path: Path) -> None:
    data = _jpeg(path)
    path.write_bytes(data[: len(data) // 2])  # truncated: the header reads, the pixels do not


@pytest.fixture()
def cod10k(tmp_path) -> Path:
    src = tmp_path / "COD10K"
    images, masks = src / "Imgs", src / "GT"
    _jpeg(images / "COD10K-CAM-1-Aquatic-1-BatFish-1.jpg")
    _mask(masks / "COD10K-CAM-1-Aquatic-1-BatFish-1.png", [(10, 5, 30, 20)])
    _jpeg(images / "COD10K-CAM-2-Terrestrial-23-Cat-2.jpg", seed=2)
    _mask(masks / "COD10K-CAM-2-Terrestrial-23-Cat-2.png", [(40, 30, 60, 46), (2, 2, 14, 12)])
    _jpeg(images / "COD10K-CAM-3-Flying-53-Owl-7.jpg", seed=7)
    _mask(masks / "COD10K-CAM-3-Flying-53-Owl-7.png", [(20, 10, 50, 40), (0, 0, 2, 1)])  # + a 2-pixel speck
    _corrupt(images / "COD10K-CAM-3-Flying-53-Bird-3.jpg")
    _mask(masks / "COD10K-CAM-3-Flying-53-Bird-3.png", [(1, 1, 9, 9)])
    _jpeg(images / "COD10K-CAM-4-Amphibian-67-Frog-4.jpg")  # its mask is missing
    _jpeg(images / "COD10K-NonCAM-5-Background-1-Sky-5.jpg")  # no object, no mask needed
    _jpeg(images / "COD10K-CAM-1-Aquatic-2-Crab-6.jpg")
    _mask(masks / "COD10K-CAM-1-Aquatic-2-Crab-6.png", [(1, 1, 9, 9)], size=(32, 32))  # wrong size
    return src


def test_cod10k_folder_imports_good_images_and_counts_bad_ones(cod10k, tmp_path):
    out = tmp_path / "out" / "cod.parquet"
    report = import_camo_folder(src=cod10k, out=out, layout="cod10k", split="test_hard")
    assert report.total == 7 and report.imported == 4 and report.rows == 4
    assert report.skipped == {"corrupt_image": 1, "missing_mask": 1, "size_mismatch": 1}
    assert report.examples["corrupt_image"] == ["COD10K-CAM-3-Flying-53-Bird-3.jpg"]
    assert report.notes["dropped_component"] == 1
    rows = {r["id"]: r for r in read_rows(out)}
    assert set(rows) == {"cod10k:COD10K-CAM-1-Aquatic-1-BatFish-1", "cod10k:COD10K-CAM-2-Terrestrial-23-Cat-2",
                         "cod10k:COD10K-CAM-3-Flying-53-Owl-7", "cod10k:COD10K-NonCAM-5-Background-1-Sky-5"}
    bat = rows["cod10k:COD10K-CAM-1-Aquatic-1-BatFish-1"]
    assert (bat["category"], bat["present"], bat["boxes"]) == ("batfish", True, [[10.0, 5.0, 30.0, 20.0]])
    cat = rows["cod10k:COD10K-CAM-2-Terrestrial-23-Cat-2"]
    assert cat["category"] == "cat" and cat["boxes"] == [[40.0, 30.0, 60.0, 46.0], [2.0, 2.0, 14.0, 12.0]]
    assert rows["cod10k:COD10K-CAM-3-Flying-53-Owl-7"]["boxes"] == [[20.0, 10.0, 50.0, 40.0]]  # speck dropped
    sky = rows["cod10k:COD10K-NonCAM-5-Background-1-Sky-5"]
    assert (sky["present"], sky["category"], sky["boxes"]) == (False, None, [])
    for row in rows.values():
        assert validate_row(row) == [] and row["split"] == "test_hard" and row["task"] == "camo"
        assert row["difficulty"] in ("easy", "hard")
    assert bat["image"] == (cod10k / "Imgs" / "COD10K-CAM-1-Aquatic-1-BatFish-1.jpg").read_bytes()  # JPEG kept


def test_alternative_cod10k_layout_and_camo_names(tmp_path):
    src = tmp_path / "COD10K-v3"
    _jpeg(src / "Image" / "COD10K-CAM-1-Aquatic-3-Pipefish-9.jpg")
    _mask(src / "GT_Object" / "COD10K-CAM-1-Aquatic-3-Pipefish-9.png", [(0, 0, 64, 10)])
    report = import_camo_folder(src=src, out=tmp_path / "a.parquet", split="train", difficulty="easy")
    assert report.rows == 1 and read_rows(tmp_path / "a.parquet")[0]["category"] == "pipefish"

    camo = tmp_path / "CAMO"
    _jpeg(camo / "Images" / "camourflage_00012.jpg")
    _mask(camo / "GT" / "camourflage_00012.png", [(5, 6, 7, 8)])
    import_camo_folder(src=camo, out=tmp_path / "b.parquet", layout="camo", split="test", difficulty="hard",
                       min_component_fraction=0.0)
    row = read_rows(tmp_path / "b.parquet")[0]
    assert (row["id"], row["category"], row["present"], row["boxes"], row["difficulty"]) == (
        "camo:camourflage_00012", None, True, [[5.0, 6.0, 7.0, 8.0]], "hard")


def test_folder_names_can_be_overridden(tmp_path):
    _jpeg(tmp_path / "pics" / "a.jpg")
    _mask(tmp_path / "labels" / "a.png", [(0, 0, 32, 24)])
    report = import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train",
                                image_dir="pics", mask_dir="labels")
    assert report.rows == 1


def test_missing_folders_fail_clearly(tmp_path):
    with pytest.raises(DatasetImportError, match=r"src: no image and mask folders .*Imgs/ \+ GT/"):
        import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train")
    with pytest.raises(ValidationError, match="layout"):
        import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="voc", split="train")


def test_a_mostly_bad_set_fails_and_leaves_no_file(tmp_path):
    for i in range(3):
        _corrupt(tmp_path / "Imgs" / f"bad{i}.jpg")
        _mask(tmp_path / "GT" / f"bad{i}.png", [(0, 0, 5, 5)])
    _jpeg(tmp_path / "Imgs" / "good.jpg")
    _mask(tmp_path / "GT" / "good.png", [(0, 0, 32, 24)])
    out = tmp_path / "out" / "set.parquet"
    with pytest.raises(DatasetImportError, match=r"75% of 4 images are bad .*corrupt_image"):
        import_camo_folder(src=tmp_path, out=out, layout="nc4k", split="train", max_bad_fraction=0.5)
    assert list(out.parent.iterdir()) == []  # neither the output nor a partial file
    report = import_camo_folder(src=tmp_path, out=out, layout="nc4k", split="train", max_bad_fraction=0.8)
    assert report.rows == 1 and out.exists()


def test_empty_masks_are_skipped_unless_they_mean_absent(tmp_path):
    _jpeg(tmp_path / "Imgs" / "a.jpg")
    _mask(tmp_path / "GT" / "a.png", [])
    _jpeg(tmp_path / "Imgs" / "b.jpg")
    _mask(tmp_path / "GT" / "b.png", [(0, 0, 32, 24)])
    report = import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train")
    assert report.skipped == {"empty_mask": 1}
    import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train",
                       empty_mask_means_absent=True)
    rows = {r["id"]: r for r in read_rows(tmp_path / "o.parquet")}
    absent = rows["nc4k:a"]
    assert (absent["present"], absent["boxes"], absent["difficulty"]) == (False, [], "easy")


def test_max_side_shrinks_images_and_boxes_together(tmp_path):
    _jpeg(tmp_path / "Imgs" / "a.jpg")
    _mask(tmp_path / "GT" / "a.png", [(10, 4, 30, 20)])
    import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train", max_side=32)
    row = read_rows(tmp_path / "o.parquet")[0]
    assert (row["width"], row["height"], row["boxes"]) == (32, 24, [[5.0, 2.0, 15.0, 10.0]])
    assert validate_row(row) == [] and row["image"].startswith(b"\x89PNG")


def test_an_object_too_small_to_keep_is_skipped_not_made_absent(tmp_path):
    """Every component dropped as speckle is not an empty mask: the flag must not turn the image into 'no animal'."""
    _jpeg(tmp_path / "Imgs" / "a.jpg", size=(640, 480))
    _mask(tmp_path / "GT" / "a.png", [(100, 100, 112, 112)], size=(640, 480))  # 144 px < 0.0005 of the image
    _jpeg(tmp_path / "Imgs" / "b.jpg")
    _mask(tmp_path / "GT" / "b.png", [(0, 0, 32, 24)])
    report = import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train",
                                empty_mask_means_absent=True)
    assert report.skipped == {"small_object": 1} and report.rows == 1
    assert [r["id"] for r in read_rows(tmp_path / "o.parquet")] == ["nc4k:b"]


def test_a_component_under_a_pixel_once_shrunk_is_widened_to_one_not_dropped(tmp_path):
    """2000 x 1500 shrunk to 200 x 150: a 200 x 200 body stays 20 x 20, a 4 px wide leg would be 0.4 px. Dropped,
    the row taught one object where the mask has two (the schema's box rule refuses that); it is widened to a
    pixel about its centre (x 100.2)."""
    size = (2000, 1500)
    _jpeg(tmp_path / "Imgs" / "a.jpg", size=size)
    _mask(tmp_path / "GT" / "a.png", [(100, 100, 300, 300), (1000, 100, 1004, 1500)], size=size)
    report = import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train",
                                max_side=200, min_component_relative=0.0)
    (row,) = read_rows(tmp_path / "o.parquet")
    body, leg = row["boxes"]
    assert body == [10.0, 10.0, 30.0, 30.0] and validate_row(row) == []
    assert leg == pytest.approx([99.7, 10.0, 100.7, 150.0], abs=1e-5) and leg[2] - leg[0] >= 1.0
    assert report.notes["dropped_component"] == 0 and not report.skipped


def test_a_second_image_with_the_same_stem_is_skipped(tmp_path):
    _jpeg(tmp_path / "Imgs" / "a.jpg")
    _jpeg(tmp_path / "Imgs" / "a.JPG", seed=1)
    _mask(tmp_path / "GT" / "a.png", [(0, 0, 32, 24)])
    report = import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", layout="nc4k", split="train")
    assert report.skipped == {"duplicate_id": 1} and report.rows == 1


def test_progress_is_reported(cod10k, tmp_path):
    seen = []
    import_camo_folder(src=cod10k, out=tmp_path / "o.parquet", split="train",
                       progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and len(seen) == 7


def _coco(tmp_path: Path, images, annotations) -> Path:
    path = tmp_path / "instances.json"
    categories = [{"id": 1, "name": "Cat"}, {"id": 2, "name": "dog"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_boxes_categories_and_bad_items(tmp_path):
    images_dir = tmp_path / "images"
    _jpeg(images_dir / "one.jpg")
    _corrupt(images_dir / "three.jpg")
    _jpeg(images_dir / "four.jpg")
    _jpeg(images_dir / "five.jpg", size=(20, 20))
    images = [
        {"id": 1, "file_name": "one.jpg", "width": W, "height": H},
        {"id": 2, "file_name": "two.jpg", "width": W, "height": H},  # file missing
        {"id": 3, "file_name": "three.jpg", "width": W, "height": H},  # corrupt
        {"id": 4, "file_name": "four.jpg", "width": W, "height": H},  # no annotation: a note, not bad
        {"id": 5, "file_name": "five.jpg", "width": W, "height": H},  # declared size is wrong
    ]
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 15], "iscrowd": 0},
        {"image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30], "iscrowd": 0},  # overhangs: clamped
        {"image_id": 1, "category_id": 2, "bbox": [0.5, 1.5, 3, 4]},
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 64, 48], "iscrowd": 1},  # crowd: dropped
        {"image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 10]},  # zero width: dropped
        {"image_id": 1, "category_id": 9, "bbox": [5, 5, 5, 5]},  # unknown category: dropped
        {"image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    out = tmp_path / "coco.parquet"
    report = import_coco(annotations_json=_coco(tmp_path, images, annotations), images_dir=images_dir, out=out,
                         split="train", max_bad_fraction=0.7)
    assert report.total == 5 and report.imported == 1 and report.rows == 1
    assert report.skipped == {"missing_image": 1, "corrupt_image": 1, "size_mismatch": 1}
    # The dogs of image 1 lost a crowd and a zero-width box: "Find every dog" with one box would teach a wrong
    # count, so that row is left out (counted); the cat's unknown-category neighbour does not touch the cats.
    assert report.notes == {"no_annotations": 1, "annotation_crowd": 1, "annotation_bad_box": 1,
                            "annotation_unknown_category": 1, "row_incomplete": 1}
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["coco:1:cat"]["boxes"] == [[10.0, 5.0, 30.0, 20.0], [50.0, 40.0, 64.0, 48.0]]
    assert "coco:1:dog" not in rows
    for row in rows.values():
        assert validate_row(row) == [] and row["task"] == "detect" and row["present"]
        assert row["category"] in row["question"]


def test_coco_mostly_bad_and_unreadable_json_fail(tmp_path):
    images = [{"id": i, "file_name": f"missing{i}.jpg", "width": W, "height": H} for i in range(3)]
    with pytest.raises(DatasetImportError, match="100% of 3 images are bad"):
        import_coco(annotations_json=_coco(tmp_path, images, []), images_dir=tmp_path, out=tmp_path / "o.parquet",
                    split="train")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetImportError, match="annotations_json: cannot read"):
        import_coco(annotations_json=tmp_path / "broken.json", images_dir=tmp_path, out=tmp_path / "o.parquet",
                    split="train")


def test_coco_rows_are_checked_as_stored(tmp_path):
    """Boxes are scaled per axis and widened to a pixel where shrinking (or float32) leaves them narrower; an
    unnamed category and a repeated image id (1 twice, or 1 and "1") are counted, not written (the loader would
    refuse those rows)."""
    images_dir = tmp_path / "images"
    _jpeg(images_dir / "a.jpg", size=(800, 600))
    _jpeg(images_dir / "b.jpg", size=(1000, 999), seed=1)
    _jpeg(images_dir / "c.jpg", seed=2)
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"},
              {"id": 1, "file_name": "c.jpg"}, {"id": "1", "file_name": "c.jpg"}]
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 200, 100]},
        {"image_id": 1, "category_id": 1, "bbox": [500, 500, 3, 3]},  # 0.75 px once shrunk to 200 x 150: widened
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 1000, 999]},  # stored 200 x 200: y scales by 200/999
        {"image_id": 3, "category_id": 1, "bbox": [0.3, 1, 1.0, 10]},  # 0.99999994 px wide as float32: widened
        {"image_id": 3, "category_id": 3, "bbox": [1, 1, 10, 10]},  # unnamed category: unknown
        {"image_id": 3, "category_id": 4, "bbox": [1, 1, 10, 10]},  # a name of punctuation alone: unknown
    ]
    path = tmp_path / "instances.json"
    categories = [{"id": 1, "name": "Cat"}, {"id": 3, "name": " "}, {"id": 4, "name": "?!"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    out = tmp_path / "coco.parquet"
    report = import_coco(annotations_json=path, images_dir=images_dir, out=out, split="train", max_side=200)
    assert report.skipped == {"duplicate_image_id": 2}
    assert report.notes == {"unnamed_category": 2, "annotation_unknown_category": 2}
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["coco:1:cat"]["boxes"] == [[25.0, 25.0, 75.0, 50.0], [124.875, 124.875, 125.875, 125.875]]  # about (125.375, 125.375)
    assert (rows["coco:2:cat"]["width"], rows["coco:2:cat"]["height"]) == (200, 200)
    assert rows["coco:2:cat"]["boxes"] == [[0.0, 0.0, 200.0, 200.0]]  # not 199.8: each side is rounded apart
    [[x1, y1, x2, y2]] = rows["coco:3:cat"]["boxes"]
    assert (x1, y1, y2) == pytest.approx((0.3, 1.0, 11.0)) and x2 - x1 >= 1.0
    assert sorted(rows) == ["coco:1:cat", "coco:2:cat", "coco:3:cat"]
    assert all(validate_row(r) == [] for r in rows.values())


def test_a_16_bit_grayscale_image_is_stored_in_8_bits_not_clipped_white(tmp_path):
    """PIL reads a 16-bit grayscale PNG as mode I;16 and converts it to RGB by clipping at 255, so every reader
    of the stored bytes would see it nearly white; the importer scales it to 8 bits and stores that."""
    src = tmp_path / "COD10K"
    values = np.linspace(0, 65535, W * H).reshape(H, W).astype(np.uint16)
    (src / "Imgs").mkdir(parents=True)
    Image.fromarray(values).save(src / "Imgs" / "COD10K-CAM-1-Aquatic-1-BatFish-1.png")
    with Image.open(src / "Imgs" / "COD10K-CAM-1-Aquatic-1-BatFish-1.png") as image:
        assert image.mode.startswith("I;16") and (np.asarray(image.convert("RGB")) == 255).mean() > 0.99  # PIL's
    _mask(src / "GT" / "COD10K-CAM-1-Aquatic-1-BatFish-1.png", [(10, 5, 30, 20)])
    out = tmp_path / "camo.parquet"
    import_camo_folder(src=src, out=out, split="test", max_bad_fraction=0.0)
    [row] = read_rows(out)
    with Image.open(io.BytesIO(row["image"])) as stored:
        pixels = np.asarray(stored.convert("RGB"))[..., 0].astype(int)
    np.testing.assert_allclose(pixels, np.rint(values / 257.0), atol=1)
    assert validate_row(row) == []


def test_auto_difficulty_is_the_best_separable_objects_not_the_union_of_all(tmp_path):
    """data.difficulty decides an image by its best-separable object (finding one is enough to answer). Measured
    on the union of the mask's components, a hidden animal dragged a plainly red one beside it into "hard"."""
    rng = np.random.default_rng(0)
    image = rng.normal(120, 18, (112, 112, 3)).clip(0, 255).astype(np.uint8)  # a textured grey background
    mask = np.zeros((112, 112), dtype=bool)
    mask[10:60, 10:100] = True  # a large animal of the background's texture: hidden
    yy, xx = np.mgrid[:112, :112]
    visible = (yy - 88) ** 2 + (xx - 56) ** 2 < 15 ** 2  # a small one, plainly red
    mask |= visible
    image[visible] = (200, 40, 40)
    name = "COD10K-CAM-1-Aquatic-1-Crab-1"
    (tmp_path / "Imgs").mkdir()
    (tmp_path / "GT").mkdir()
    Image.fromarray(image).save(tmp_path / "Imgs" / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "GT" / f"{name}.png")
    from data.difficulty import camouflage_stats

    assert camouflage_stats(image, mask).difficulty == "hard"  # the union, as it was measured
    import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", split="train", layout="cod10k")
    (row,) = read_rows(tmp_path / "o.parquet")
    assert len(row["boxes"]) == 2 and row["difficulty"] == "easy"


def test_a_float_image_is_scaled_to_8_bits_not_truncated_black(tmp_path):
    """PIL converts a float image (mode F, a [0, 1] thermal TIFF) to RGB by truncating: every pixel 0 or 1."""
    values = np.tile(np.linspace(0.0, 1.0, W, dtype=np.float32), (H, 1))
    (tmp_path / "Imgs").mkdir()
    Image.fromarray(values, mode="F").save(tmp_path / "Imgs" / "thermal.tif")
    _mask(tmp_path / "GT" / "thermal.png", [(16, 8, 40, 30)])
    import_camo_folder(src=tmp_path, out=tmp_path / "o.parquet", split="t", layout="camo", image_dir="Imgs",
                       mask_dir="GT")
    (row,) = read_rows(tmp_path / "o.parquet")
    with Image.open(io.BytesIO(row["image"])) as stored:
        pixels = np.asarray(stored.convert("L"), dtype=np.float64)
    assert pixels[0, 0] == 0 and pixels[0, -1] == 255
    assert np.allclose(pixels[0], np.rint(np.linspace(0, 255, W)), atol=1)
