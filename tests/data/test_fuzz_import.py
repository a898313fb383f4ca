"""Fuzzing the data entry points: corrupt image bytes, masks, file names and COCO JSON fragments.

Whatever goes in, the importers and ``validate_row`` never raise (an importer may refuse a whole
input with ``DatasetImportError``, a clear message naming what is wrong, only when the input as a
whole is unusable); every bad item is counted under a known reason, and every row that does come out
is valid. Inputs come from hypothesis: valid images mutated (truncated, bytes flipped, chunks
rewritten), format headers followed by garbage, random bytes; masks of the wrong size, empty or
corrupt; file names with odd characters; COCO documents whose every field may have the wrong type.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data.importers import DatasetImportError, import_camo_folder, import_coco
from data.schema import FIELD_NAMES, ROW_SCHEMA, decoded_size, read_rows, validate_row
from deploy.training_data import BadDatasetError, load_training_data

# Headers declaring tens of millions of pixels, and broken metadata, are the point; PIL warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")]

# Inputs are built per example and each example writes files: no per-example deadline (the machine is
# shared), and function-scoped fixtures are not used inside the examples.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CAMO_SKIP_REASONS = {"corrupt_image", "missing_mask", "corrupt_mask", "size_mismatch", "empty_mask", "small_object",
                     "duplicate_id"}
COCO_SKIP_REASONS = {"bad_image_entry", "missing_image", "corrupt_image", "size_mismatch", "duplicate_image_id"}
PROBLEM_FIELDS = set(FIELD_NAMES) | {"row"}

MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM",
         b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\x00\x00\x01\x00", b"8BPS", b"P6\n",
         b"\x00\x00\x00\x0cjP  ", b"qoif", b"DDS "]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _with_png_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR chunk declaring width x height (CRC fixed, so only the size is wrong)."""
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return png[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + png[33:]


@st.composite
def images(draw) -> bytes:
    """Encoded image bytes: valid, mutated, a format header with garbage, or plain garbage."""
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "declared", "magic", "random", "empty"]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["RGB", "L"]))
    pixels = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    data = _encode(pixels if mode == "RGB" else pixels[..., 0], draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF"])))
    if kind == "valid":
        return data
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "declared":  # a PNG whose header lies about its size: zero, huge or just different
        png = _encode(pixels, "PNG")
        side = st.one_of(st.sampled_from([0, 1, 2**16, 2**20, 2**31 - 1, 2**32 - 1]), st.integers(0, 100))
        return _with_png_size(png, draw(side), draw(side))
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300))
    return b""


# --- validate_row and decoded_size ------------------------------------------------------------------

def _good_row(image: bytes, w: int, h: int) -> dict:
    return dict(id="r", image=image, width=w, height=h, task="camo", question="Is there an animal?",
                category="moth", boxes=[[0.0, 0.0, float(w), float(h)]], present=True, split="train",
                difficulty="easy")


not_a_dict = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(-5, 5), max_size=5),
    st.lists(st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-10, 10), st.text(max_size=2)),
                      max_size=5), max_size=3),
)
anything = st.one_of(not_a_dict, st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(image=images(), changes=st.dictionaries(st.sampled_from(FIELD_NAMES), anything, max_size=4),
       drop=st.sets(st.sampled_from(FIELD_NAMES), max_size=2))
def test_validate_row_names_a_field_for_every_problem_and_never_raises(image, changes, drop):
    size = decoded_size(image)
    assert size is None or (isinstance(size[0], int) and size[0] > 0 and size[1] > 0)
    w, h = size or (8, 8)
    row = {**_good_row(image, w, h), **changes}
    for name in drop:
        del row[name]
    problems = validate_row(row)
    assert all(p.split(":", 1)[0].split("[", 1)[0] in PROBLEM_FIELDS for p in problems), problems
    if size is None and "image" not in changes:
        assert problems  # undecodable bytes never pass
    if not problems:  # what passes can be used: the image decodes to the declared size
        assert decoded_size(row["image"]) == (row["width"], row["height"])


@given(row=st.one_of(not_a_dict, st.lists(anything, max_size=3)))
def test_validate_row_of_a_non_dict(row):
    assert validate_row(row) == [f"row: expected a dict, got {type(row).__name__}"]


@FUZZ
@given(rows=st.lists(st.tuples(images(), st.sampled_from(["ok", "box", "size", "category", "none-coordinate"])),
                     min_size=1, max_size=12))
def test_training_data_counts_every_bad_row_of_a_parquet_file(rows):
    """Rows as Parquet stores them (the schema fixes the types; a box coordinate may still be null)."""
    good = _encode(np.zeros((8, 8, 3), dtype=np.uint8), "PNG")
    table = [_good_row(good, 8, 8) | {"id": "good"}]
    for i, (image, change) in enumerate(rows):
        size = decoded_size(image) or (8, 8)
        row = _good_row(image, *size) | {"id": f"r{i}"}
        if change == "box":
            row["boxes"] = [[5.0, 5.0, 5.0, 9.0]]
        elif change == "size":
            row["width"] = size[0] + 1
        elif change == "category":
            row["category"] = " ?! "
        elif change == "none-coordinate":
            row["boxes"] = [[1.0, None, 4.0, 4.0]]
        table.append(row)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        pq.write_table(pa.Table.from_pylist(table, schema=ROW_SCHEMA), path)
        data = load_training_data(path, max_bad_fraction=1.0)
    expected_bad = sum(1 for image, change in rows if change != "ok" or decoded_size(image) is None)
    assert sum(data.bad_rows.values()) == expected_bad
    assert len(data.rows) == 1 + len(rows) - expected_bad
    assert set(data.bad_rows) <= PROBLEM_FIELDS


def test_a_file_that_is_not_parquet_is_a_clear_error(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BadDatasetError, match="cannot read"):
        load_training_data(path, max_bad_fraction=1.0)


# --- camouflage folders ------------------------------------------------------------------------------

stems = st.one_of(
    st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=30),
    st.builds("COD10K-{}-{}-{}-{}-{}-{}".format, st.sampled_from(["CAM", "NonCAM", "cam", ""]), st.integers(0, 9),
              st.text("abcXYZ-", max_size=6), st.integers(0, 99), st.text("abcXYZ", max_size=6), st.integers(0, 9)),
)


@st.composite
def masks(draw, size: tuple[int, int] | None) -> bytes | None:
    kind = draw(st.sampled_from(["rect", "rect", "empty", "speckle", "wrong_size", "missing", "corrupt"]))
    if kind == "missing" or size is None and kind != "corrupt":
        return None
    if kind == "corrupt":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=100))
    w, h = size if kind != "wrong_size" else (size[0] + 3, size[1] + 1)
    mask = np.zeros((h, w), dtype=np.uint8)
    if kind == "rect":
        x1, y1 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        mask[y1: draw(st.integers(y1 + 1, h)), x1: draw(st.integers(x1 + 1, w))] = 255
    elif kind == "speckle":
        mask[np.random.default_rng(draw(st.integers(0, 99))).random((h, w)) > 0.9] = 255
    return _encode(mask, "PNG")


@st.composite
def camo_folders(draw) -> list[tuple[str, bytes, bytes | None]]:
    names = draw(st.lists(st.tuples(stems, st.sampled_from([".jpg", ".png", ".JPG", ".bmp", ".jpeg"])),
                          min_size=1, max_size=8, unique_by=lambda t: (t[0] + t[1]).encode("utf-8", "surrogatepass")))
    items = []
    for stem, suffix in names:
        image = draw(images())
        items.append((stem + suffix, image, draw(masks(decoded_size(image)))))
    return items


def _writable(name: str) -> bool:
    try:
        name.encode()  # the file system takes UTF-8 names only
    except UnicodeEncodeError:
        return False
    return name not in (".", "..") and len(name.encode()) < 250


@FUZZ
@given(items=camo_folders(), layout=st.sampled_from(["cod10k", "camo", "nc4k"]))
def test_camo_folder_import_counts_every_bad_image(items, layout):
    items = [item for item in items if _writable(item[0])]
    if not items:
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "set"
        image_dir, mask_dir = {"cod10k": ("Imgs", "GT"), "camo": ("Images", "GT"), "nc4k": ("Imgs", "GT")}[layout]
        (src / image_dir).mkdir(parents=True)
        (src / mask_dir).mkdir()
        masked_stems = set()
        for name, image, mask in items:
            (src / image_dir / name).write_bytes(image)
            stem = Path(name).stem
            if mask is not None and stem not in masked_stems:
                (src / mask_dir / f"{stem}.png").write_bytes(mask)
                masked_stems.add(stem)
        out = Path(tmp) / "out.parquet"
        report = import_camo_folder(src=src, out=out, layout=layout, split="train", max_bad_fraction=1.0,
                                    min_component_fraction=0.0)
        rows = read_rows(out)
    assert report.total == len(items)
    assert report.imported + sum(report.skipped.values()) == report.total
    assert set(report.skipped) <= CAMO_SKIP_REASONS
    assert report.rows == report.imported == len(rows)
    for row in rows:
        assert validate_row(row) == [], row["id"]


# --- COCO JSON ---------------------------------------------------------------------------------------

number = st.one_of(st.integers(-5, 200), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70))
junk = st.one_of(st.none(), st.booleans(), number, st.text(max_size=6), st.lists(st.integers(0, 3), max_size=3),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
odd_names = ["a.png", "b.jpg", "c.png", "missing.jpg", "../a.png", "/etc/hostname", "", "sub/dir.png", "nul\x00.png",
             ".", "\U0001f98b.png"]
file_names = st.one_of(st.sampled_from(odd_names), st.text(max_size=8), junk)
ids = st.one_of(st.integers(0, 4), st.integers(0, 4), junk)  # mostly ids that match


@st.composite
def coco_documents(draw) -> object:
    image_entries = draw(st.lists(st.one_of(
        st.fixed_dictionaries({"id": ids, "file_name": st.one_of(st.sampled_from(["a.png", "c.png"]), file_names)},
                              optional={"width": st.one_of(st.just(16), st.just(16), number, junk),
                                        "height": st.one_of(st.just(12), st.just(5), number, junk)}),
        junk), max_size=6))
    annotations = draw(st.lists(st.one_of(
        st.fixed_dictionaries({}, optional={
            "image_id": ids, "category_id": st.one_of(st.integers(0, 3), st.integers(1, 2), junk),
            "bbox": st.one_of(st.lists(st.integers(0, 20), min_size=4, max_size=4),
                              st.lists(number, min_size=4, max_size=4), junk, st.lists(junk, max_size=5)),
            "iscrowd": st.one_of(st.integers(0, 1), junk)}),
        junk), max_size=10))
    categories = draw(st.one_of(
        st.just([{"id": 1, "name": "cat"}, {"id": 2, "name": "Dog"}]),
        st.lists(st.one_of(st.fixed_dictionaries({"id": ids, "name": junk}), junk), max_size=3)))
    document = {"images": image_entries, "annotations": annotations, "categories": categories}
    for key in draw(st.sets(st.sampled_from(sorted(document)), max_size=1)):  # sometimes a key is missing
        del document[key]
    return draw(st.one_of(st.just(document), st.just(document), st.just(document), junk))


@FUZZ
@given(document=coco_documents(), text_damage=st.sampled_from(["none", "none", "none", "truncate", "garbage"]))
def test_coco_import_counts_every_bad_image_entry(document, text_damage):
    with tempfile.TemporaryDirectory() as tmp:
        images_dir = Path(tmp) / "images"
        images_dir.mkdir()
        pixels = np.full((12, 16, 3), 90, dtype=np.uint8)
        (images_dir / "a.png").write_bytes(_encode(pixels, "PNG"))
        (images_dir / "b.jpg").write_bytes(_encode(pixels, "JPEG")[:40])  # corrupt
        (images_dir / "c.png").write_bytes(_encode(pixels[:5], "PNG"))  # 16 x 5: its declared size may differ
        text = json.dumps(document)  # NaN and Infinity become the tokens json.loads accepts again
        if text_damage == "truncate":
            text = text[: len(text) // 2]
        elif text_damage == "garbage":
            text = "\x00{]" + text
        path = Path(tmp) / "instances.json"
        path.write_text(text)
        out = Path(tmp) / "out.parquet"
        try:
            report = import_coco(annotations_json=path, images_dir=images_dir, out=out, split="train",
                                 max_bad_fraction=1.0)
        except DatasetImportError as error:  # the document as a whole is unusable: said clearly
            assert str(error).startswith(("annotations_json:", "no images found")), error
            return
        rows = read_rows(out)
    entries = document["images"]
    assert report.total == len(entries)
    assert report.imported + sum(report.skipped.values()) + report.notes["no_annotations"] == report.total
    assert set(report.skipped) <= COCO_SKIP_REASONS
    assert report.rows == len(rows) >= report.imported
    for row in rows:
        assert validate_row(row) == [], row["id"]
        assert all(math.isfinite(v) for box in row["boxes"] for v in box)
