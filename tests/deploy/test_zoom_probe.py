"""bench.zoom_probe's oracle zooms: the crop a perfect first turn would ask for, with its boxes mapped into it."""

import io

import numpy as np
from PIL import Image

from actors.env import ImageLimits, decode_image
from bench.zoom_probe import zoomed_rows

LIMITS = ImageLimits(factor=28, min_pixels=112 * 112, max_pixels=112 * 112)  # the small model's processor


def _row(row_id: str, boxes) -> dict:
    pixels = np.zeros((112, 112, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(112, dtype=np.uint8)[None, :]  # red encodes x, green encodes y
    pixels[:, :, 1] = np.arange(112, dtype=np.uint8)[:, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return {"id": row_id, "image": buffer.getvalue(), "width": 112, "height": 112, "task": "camo", "question": "q",
            "category": "moth" if boxes else None, "boxes": boxes, "present": bool(boxes), "split": "test_hard",
            "difficulty": "hard"}


def test_a_present_row_becomes_its_oracle_crop_with_the_boxes_in_the_crop():
    # box 20 x 40: region side ceil(40 * 1.4) = 56, centred at (40, 50): [12, 22, 68, 78], shown at 112 (x2)
    (zoomed,) = zoomed_rows([_row("a", [[30.0, 30.0, 50.0, 70.0]])], context=1.4, min_side=28, zoom_pixels=112 * 112,
                            limits=LIMITS, seed=0)
    assert (zoomed["width"], zoomed["height"]) == (112, 112)
    assert zoomed["boxes"] == [[36.0, 16.0, 76.0, 96.0]]  # ((30, 30, 50, 70) - (12, 22)) * 2
    red, green, _ = decode_image(zoomed["image"]).getpixel((1, 1))
    assert abs(red - 12) <= 1 and abs(green - 22) <= 1  # the crop's corner is the region's


def test_an_empty_row_gets_a_region_of_a_present_rows_size_inside_the_image():
    rows = [_row("a", [[30.0, 30.0, 50.0, 70.0]]), _row("b", [])]
    zoomed = zoomed_rows(rows, context=1.4, min_side=28, zoom_pixels=112 * 112, limits=LIMITS, seed=3)
    empty = zoomed[1]
    assert empty["boxes"] == [] and not empty["present"] and (empty["width"], empty["height"]) == (112, 112)
    left, top, _ = decode_image(empty["image"]).getpixel((1, 1))
    right, bottom, _ = decode_image(empty["image"]).getpixel((110, 110))
    # the present row's 56 px side (a region reaching past the image would be cut short: PIL pads it black)
    assert abs((right - left) - 55) <= 2 and abs((bottom - top) - 55) <= 2
