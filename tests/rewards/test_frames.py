"""rewards.frames: hand-computed conversions, smart_resize pinned to transformers, round trips."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.frames import (
    INPUT,
    NORM1000,
    ORIGINAL,
    FrameConfig,
    FrameSpec,
    crop_to_original,
    from_original,
    smart_resize,
    to_original,
)


@pytest.mark.parametrize(
    "height, width, kwargs, expected",
    [
        # 480/28 = 17.14 -> 17 * 28 = 476; 640/28 = 22.86 -> 23 * 28 = 644; area inside the bounds.
        (480, 640, {}, (476, 644)),
        # Python rounds half to even, as transformers does: 70/28 = 2.5 -> 2.
        (70, 700, {}, (56, 700)),
        (42, 700, {}, (56, 700)),  # 1.5 -> 2
        # Too many pixels: beta = sqrt(2000 * 1000 / 50176) = 6.3135; floor(2000/6.3135/28) = 11,
        # floor(1000/6.3135/28) = 5.
        (2000, 1000, {"max_pixels": 28 * 28 * 64}, (308, 140)),
        # Too few: beta = sqrt(3136 / 600) = 2.2862; ceil(20 * 2.2862 / 28) = 2, ceil(30 * 2.2862 / 28) = 3.
        (20, 30, {}, (56, 84)),
    ],
)
def test_smart_resize_table(height, width, kwargs, expected):
    assert smart_resize(height, width, **kwargs) == expected


def test_smart_resize_rejects_extreme_aspect_and_empty_images():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def _transformers_smart_resize():
    """transformers' own function: the PIL image processor module needs no torchvision."""
    for module in (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
        "transformers.models.qwen2_vl.image_processing_qwen2_vl",
    ):
        try:
            return importlib.import_module(module).smart_resize
        except ImportError:
            continue
    pytest.skip("transformers' Qwen2-VL smart_resize cannot be imported here")


def test_smart_resize_equals_transformers():
    theirs = _transformers_smart_resize()
    sizes = [14, 27, 28, 42, 56, 70, 97, 112, 223, 224, 333, 480, 640, 1000, 1023, 1920, 4032]
    bounds = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 16), (200 * 200, 200 * 200)]
    checked = 0
    for min_pixels, max_pixels in bounds:
        for h in sizes:
            for w in sizes:
                if max(h, w) / min(h, w) > 200:
                    continue
                ours = smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
                assert ours == theirs(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels), (h, w)
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    "frame, box, expected",
    [
        (FrameSpec(kind=ORIGINAL), [10, 20, 30, 40], [10, 20, 30, 40]),
        # 640x480 image: x * 0.64, y * 0.48.
        (FrameSpec(kind=NORM1000), [100, 200, 500, 1000], [64, 96, 320, 480]),
        # Model input 644x476 of a 640x480 image: x * 640/644, y * 480/476.
        (FrameSpec(kind=INPUT, input_width=644, input_height=476), [161, 119, 322, 238], [160, 120, 320, 240]),
        # A 200x200 crop at (100, 50) shown at 448x448: x * 200/448 + 100, y * 200/448 + 50.
        (
            FrameSpec(kind=INPUT, input_width=448, input_height=448, crop=(100, 50, 300, 250)),
            [224, 0, 448, 224],
            [200, 50, 300, 150],
        ),
        # norm1000 relative to that crop.
        (FrameSpec(kind=NORM1000, crop=(100, 50, 300, 250)), [500, 500, 1000, 1000], [200, 150, 300, 250]),
        # Crop pixels at native resolution: only the offset.
        (FrameSpec(kind=ORIGINAL, crop=(100, 50, 300, 250)), [0, 0, 10, 10], [100, 50, 110, 60]),
        # x2 < x1 is carried through unchanged (rewards.iou reorders it).
        (FrameSpec(kind=NORM1000), [500, 0, 0, 500], [320, 0, 0, 240]),
    ],
)
def test_to_original_table(frame, box, expected):
    assert to_original([box], frame=frame, width=640, height=480) == [pytest.approx(expected)]


def test_crop_to_original_helper():
    got = crop_to_original([[224, 0, 448, 224]], crop_box=(100, 50, 300, 250), crop_size=(448, 448))
    assert got == [pytest.approx([200, 50, 300, 150])]


def test_frame_config_input_spec_uses_smart_resize():
    spec = FrameConfig(kind="input").spec(width=640, height=480)
    assert (spec.input_width, spec.input_height) == (644, 476)
    assert FrameConfig(kind="norm1000").spec(width=640, height=480) == FrameSpec(kind=NORM1000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "pixels"}, "kind"),
        ({"kind": INPUT}, "input_width"),
        ({"kind": INPUT, "input_width": 0, "input_height": 10}, "input_width"),
        ({"kind": ORIGINAL, "crop": (10, 10, 5, 20)}, "crop"),
    ],
)
def test_frame_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrameSpec(**kwargs)


def test_frame_config_rejects_inverted_pixel_bounds():
    with pytest.raises(ValueError, match="min_pixels"):
        FrameConfig(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="extra"):
        FrameConfig(kind="input", max_pixel=10)


frames = st.sampled_from(
    [
        FrameSpec(kind=ORIGINAL),
        FrameSpec(kind=NORM1000),
        FrameSpec(kind=INPUT, input_width=644, input_height=476),
        FrameSpec(kind=INPUT, input_width=224, input_height=448, crop=(13.5, 7.0, 201.0, 99.5)),
        FrameSpec(kind=NORM1000, crop=(0.0, 0.0, 320.0, 240.0)),
    ]
)


@settings(max_examples=200, deadline=None)
@given(frame=frames, box=st.lists(st.floats(-2000, 2000), min_size=4, max_size=4))
def test_round_trip(frame, box):
    back = to_original(from_original([box], frame=frame, width=640, height=480), frame=frame, width=640, height=480)
    assert back == [pytest.approx(box, abs=1e-6)]
