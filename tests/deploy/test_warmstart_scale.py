"""bench.warmstart_scale --save: the tower it trained is kept as a model directory that records the warm start it ran
(the benchmark itself runs thousands of steps on a GPU)."""

import json

import pytest

torch = pytest.importorskip("torch")


def test_save_keeps_the_warm_started_model_and_records_its_warm_start(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from bench.warmstart_scale import main
    from models.build import BUILD_INFO_FILE, RECIPES, WARM_START_FILE, build_model

    saved = tmp_path / "tower"
    assert main(["--steps", "2", "--batch-images", "4", "--log-every", "1", "--workers", "0", "--device", "cpu",
                 "--category-weight", "0", "--save", str(saved)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["at_end"]["step"] == 2
    recipe = json.loads((saved / BUILD_INFO_FILE).read_text())["recipe"]
    assert recipe["warm_start"]["steps"] == 2 and recipe["warm_start"]["category_weight"] == 0.0
    assert "warmstart/box_loss" in json.loads((saved / WARM_START_FILE).read_text())
    # The saved weights are the trained tower's, not the build's random ones: a fresh build differs from them.
    pixels = 112 * 112
    untrained = build_model(size="small", out_dir=tmp_path / "untrained", recipe=RECIPES["small"].model_copy(
        update={"min_pixels": pixels, "max_pixels": pixels, "warm_start": None}))
    trained_tower = AutoModelForImageTextToText.from_pretrained(saved).model.visual.state_dict()
    random_tower = AutoModelForImageTextToText.from_pretrained(untrained).model.visual.state_dict()
    assert any(not torch.equal(trained_tower[k], random_tower[k]) for k in trained_tower)
