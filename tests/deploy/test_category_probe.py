"""bench.category_probe: the two views of the same animals, and one small run end to end on the tiny model."""

import json

import numpy as np
import pytest

from actors.env import ImageLimits
from bench.category_probe import main, view_images

LIMITS = ImageLimits(factor=28, min_pixels=112 * 112, max_pixels=112 * 112)  # the small model's processor
DRAWN = dict(difficulty=(0.2, 0.45), context=1.2, image_size=112, limits=LIMITS)


def test_both_views_show_the_same_balanced_animals_the_crop_enlarged():
    whole, whole_labels = view_images(view="whole", n=14, seed=5, **DRAWN)
    crop, crop_labels = view_images(view="crop", n=14, seed=5, **DRAWN)
    assert whole_labels == crop_labels == [i % 7 for i in range(14)]
    assert all(image.size == (112, 112) for image in whole + crop)
    # An enlarged crop is smoother: neighbouring pixels differ less than in the whole image.
    def roughness(images):
        return np.mean([np.abs(np.diff(np.asarray(image, dtype=np.float32), axis=1)).mean() for image in images])
    assert roughness(crop) < 0.8 * roughness(whole)
    with pytest.raises(ValueError, match="view"):
        view_images(view="side", n=1, seed=0, **DRAWN)


def test_a_small_run_reports_each_view_per_epoch(tiny_model_dir, capsys):
    assert main([str(tiny_model_dir), "--train", "14", "--test", "7", "--epochs", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"whole", "crop"} and out["crop"]["context"] == 1.2
    for view in out.values():
        assert len(view["accuracy_per_epoch"]) == 2 and all(0.0 <= a <= 1.0 for a in view["accuracy_per_epoch"])
        assert view["chance"] == pytest.approx(1 / 7)
