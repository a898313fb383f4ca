"""Contact sheet: size, ground-truth and predicted boxes in their colours, robustness to bad rows."""

from __future__ import annotations

import io

from PIL import Image

from data.contact_sheet import (BACKGROUND, GT_COLOUR, LINE_HEIGHT, PRED_COLOUR, ZOOM_COLOUR, draw_contact_sheet,
                                sheet_size)


def _row(row_id: str, boxes, *, image: bytes | None = None):
    if image is None:
        buffer = io.BytesIO()
        Image.new("RGB", (56, 56), (128, 128, 128)).save(buffer, format="PNG")
        image = buffer.getvalue()
    return {"id": row_id, "image": image, "width": 56, "height": 56, "category": "moth" if boxes else None,
            "boxes": boxes, "difficulty": "easy"}


def test_sheet_draws_ground_truth_and_predictions_in_their_colours(tmp_path):
    rows = [_row("a", [[10, 10, 20, 30]]), _row("b", []), _row("c", [[0, 0, 56, 56]])]
    predictions = {"a": {"present": True, "category": "moth", "boxes": [[30, 5, 50, 25], [1, 2, "x", 4]],
                         "zoom_boxes": [[5, 5, 45, 45]]},
                   "b": {"present": False, "category": None, "boxes": []}}
    out = tmp_path / "sheet.png"
    size = draw_contact_sheet(rows, out_path=out, columns=2, tile=112, predictions=predictions)
    assert size == sheet_size(3, columns=2, tile=112, with_predictions=True) == (224, 2 * (112 + 2 * LINE_HEIGHT))
    with Image.open(out) as sheet:
        assert sheet.size == size
        pixels = sheet.convert("RGB").load()
        # The 56 px image is scaled by 2 into its 112 px tile: GT box corners at (20, 20) and (39, 59).
        assert pixels[20, 20] == GT_COLOUR and pixels[39, 59] == GT_COLOUR
        assert pixels[60, 10] == PRED_COLOUR and pixels[99, 49] == PRED_COLOUR
        assert pixels[10, 70] == ZOOM_COLOUR and pixels[89, 89] == ZOOM_COLOUR  # the zoomed region, x2
        assert pixels[30, 40] == (128, 128, 128)  # inside the box the image is untouched
        # Third row ("c") starts the second grid row; its full-image box outlines the tile.
        top = 112 + 2 * LINE_HEIGHT
        assert pixels[0, top] == GT_COLOUR and pixels[111, top + 111] == GT_COLOUR
        assert pixels[150, top + 50] == BACKGROUND  # the empty fourth cell


def test_undecodable_images_are_drawn_as_labelled_empty_tiles(tmp_path):
    rows = [_row("a", [[1, 1, 5, 5]], image=b"garbage")]
    size = draw_contact_sheet(rows, out_path=tmp_path / "s.png", columns=4, tile=64)
    assert size == (256, 64 + LINE_HEIGHT)
    with Image.open(tmp_path / "s.png") as sheet:
        assert sheet.convert("RGB").getpixel((10, 10)) == BACKGROUND


def test_labels_say_present_without_a_category_and_thin_boxes_are_drawn(tmp_path):
    """A CAMO-style row (an object, no category) and an answer naming none read "present", not "absent"; a box
    thinner than a pixel at the tile's scale (0.5 px of a 56 px image in a 16 px tile) is drawn, not an error."""
    from data.contact_sheet import _verdict

    row = {**_row("a", [[10, 10, 10.5, 40]]), "category": None, "present": True}
    assert _verdict(row) == "present" and _verdict({"present": False, "category": None}) == "absent"
    assert _verdict({"present": True, "category": "moth"}) == "moth"
    assert _verdict({"present": False, "category": "moth"}) == "absent"  # as the evaluation scores it
    predictions = {"a": {"present": True, "category": None, "boxes": [[30, 30, 30.1, 30.2]]}}
    size = draw_contact_sheet([row], out_path=tmp_path / "s.png", columns=1, tile=16, predictions=predictions)
    with Image.open(tmp_path / "s.png") as sheet:
        assert sheet.size == size
        column = [sheet.convert("RGB").getpixel((2, y)) for y in range(16)]
        assert GT_COLOUR in column  # the thin ground-truth box at x = 10 * 16 / 56 = 2.9


def test_predicted_boxes_are_drawn_as_scored_reordered_and_clipped_to_their_image(tmp_path):
    """Scoring reorders a box's corners and clips it to the image: a box written right-to-left is drawn, and one
    reaching past the image's left edge stops there instead of running into the neighbouring tile."""
    rows = [_row("a", []), _row("b", [])]
    predictions = {"a": {"present": True, "category": "moth", "boxes": [[40, 40, 10, 10]]},
                   "b": {"present": True, "category": "moth", "boxes": [[-30, 10, 20, 20]]}}
    draw_contact_sheet(rows, out_path=tmp_path / "s.png", columns=2, tile=112, predictions=predictions)
    with Image.open(tmp_path / "s.png") as sheet:
        pixels = sheet.convert("RGB").load()
    # Scale 2: "a" is the box (20, 20)-(79, 79) of tile 0.
    assert pixels[20, 50] == PRED_COLOUR and pixels[79, 50] == PRED_COLOUR
    # "b" is clipped to x >= 0 of tile 1 (left 112): its left edge at x = 112, nothing of it in tile 0.
    assert pixels[112, 30] == PRED_COLOUR
    assert all(pixels[x, y] != PRED_COLOUR for x in range(81, 112) for y in range(112))
