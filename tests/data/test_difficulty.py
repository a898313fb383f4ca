"""The camouflage statistic: hand-checkable cases, and hard synthetic images score harder than easy."""

from __future__ import annotations

import numpy as np
import pytest

from data.difficulty import COLOUR_SCALE, HARD_BELOW, camouflage_stats, image_stats, srgb_to_lab
from data.synth import CATEGORIES, SynthConfig, generate_sample


def test_lab_conversion_matches_reference_values():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [119, 119, 119]], dtype=np.uint8))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # standard sRGB red
    assert abs(lab[3, 0] - 50.0) < 0.1  # sRGB 119 grey is mid lightness


def _square(size=40, low=12, high=28):
    mask = np.zeros((size, size), dtype=bool)
    mask[low:high, low:high] = True
    return mask


def test_white_square_on_black_is_maximally_separable():
    mask = _square()
    image = np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=-1)[..., :3]
    stats = camouflage_stats(image, mask)
    # Flat regions: every measured gradient is 0 (the edge is inside the excluded gap) → texture 0.
    assert stats.texture_distance == 0.0
    assert stats.colour_distance == pytest.approx(100.0, abs=0.01)
    assert stats.separability == pytest.approx(100.0 / COLOUR_SCALE, abs=0.01)
    assert stats.difficulty == "easy"


def test_same_material_inside_and_outside_is_hidden():
    rng = np.random.default_rng(0)
    image = rng.integers(100, 140, (40, 40, 1)).astype(np.uint8).repeat(3, axis=-1)
    stats = camouflage_stats(image, _square())
    assert stats.colour_distance < 2.0 and stats.texture_distance < 0.2
    assert stats.difficulty == "hard"


def test_texture_alone_is_measured():
    mask = _square()
    image = np.full((40, 40, 3), 120, dtype=np.uint8)
    # Stripes two pixels wide: every interior pixel has a lightness gradient of about 16 per pixel
    # (top bin) while the flat ring has 0 (lowest bin), so the histograms do not overlap at all.
    stripes = np.where(np.arange(40) % 4 < 2, 80, 160).astype(np.uint8)[None, :].repeat(40, axis=0)
    image[mask] = stripes[mask][:, None]
    stats = camouflage_stats(image, mask)
    assert stats.texture_distance == pytest.approx(1.0)
    assert stats.colour_distance < 2.0  # the stripes' mean colour is the surroundings' grey


def test_unmeasurable_masks_give_none():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    assert camouflage_stats(image, np.zeros((20, 20), dtype=bool)) is None
    assert camouflage_stats(image, np.ones((20, 20), dtype=bool)) is None  # no surroundings
    assert image_stats(image, []) is None
    with pytest.raises(ValueError, match="mask"):
        camouflage_stats(image, np.zeros((10, 10), dtype=bool))


def test_hard_synthetic_images_are_measurably_harder_than_easy_ones():
    config = SynthConfig(seed=0, n=1)
    scores = {}
    for name, (low, high) in (("easy", config.easy_range), ("hard", config.hard_range)):
        stats = []
        for i in range(60):
            rng = np.random.default_rng([21, i])
            sample = generate_sample(rng, image_size=112, difficulty=float(rng.uniform(low, high)),
                                     category=CATEGORIES[i % len(CATEGORIES)])
            stats.append(image_stats(sample.image, sample.masks))
        scores[name] = stats
    mean = {k: float(np.mean([s.separability for s in v])) for k, v in scores.items()}
    colour = {k: float(np.mean([s.colour_distance for s in v])) for k, v in scores.items()}
    labelled_hard = {k: sum(s.difficulty == "hard" for s in v) for k, v in scores.items()}
    # Measured: separability easy ≈ 3.1, hard ≈ 2.1 (std ≈ 0.9 each: the gap is ~6 standard errors).
    assert mean["hard"] < mean["easy"] - 0.5, mean
    assert colour["hard"] < colour["easy"] - 3.0, colour
    assert labelled_hard["hard"] > labelled_hard["easy"] + 10, labelled_hard
    assert 1.0 < HARD_BELOW < 4.0
