"""The perception warm start's pure parts (targets, schedules) and a few real steps on the tiny model."""

import math

import numpy as np
import pytest

from models.warmstart import (WS_BOX, WS_CATEGORY, WS_LOSS, WS_OBJECTNESS, WarmStartConfig, cell_targets,
                              difficulty_bounds, lr_at)


def test_cell_targets_hand_computed():
    # An 8 px image on a 2×2 grid (4 px cells); the body covers the top-left cell fully and half of the
    # top-right one; its box is [0, 0, 6, 4].
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:4, 0:6] = True
    t = cell_targets([mask], [[0.0, 0.0, 6.0, 4.0]], 3, image_size=8, grid=2)
    np.testing.assert_allclose(t["objectness"], [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(t["category"], [3, 3, -1, -1])  # coverage >= 0.3
    # Cell centres (2, 2) and (6, 2): only (2, 2) lies strictly inside the box.
    np.testing.assert_array_equal(t["box_valid"], [True, False, False, False])
    np.testing.assert_allclose(t["box"][0], np.array([2 - 0, 2 - 0, 6 - 2, 4 - 2]) / 8)


def test_cell_targets_of_an_empty_image_are_all_background():
    t = cell_targets([], [], None, image_size=8, grid=2)
    assert not t["objectness"].any() and (t["category"] == -1).all() and not t["box_valid"].any()


def test_difficulty_ramps_from_easy_to_all():
    config = WarmStartConfig(steps=100, easy_first_fraction=0.5, easy_range=(0.2, 0.4), hard_high=0.9)
    assert difficulty_bounds(0, config=config) == (0.2, 0.4)
    assert difficulty_bounds(25, config=config) == pytest.approx((0.2, 0.65))
    assert difficulty_bounds(50, config=config) == pytest.approx((0.2, 0.9))
    assert difficulty_bounds(99, config=config) == pytest.approx((0.2, 0.9))


def test_lr_warms_up_then_decays_to_five_percent():
    config = WarmStartConfig(steps=110, warmup_steps=10, lr=1e-3)
    assert lr_at(0, config=config) == pytest.approx(1e-4)
    assert lr_at(9, config=config) == pytest.approx(1e-3)
    assert lr_at(10, config=config) == pytest.approx(1e-3)
    assert lr_at(60, config=config) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(110, config=config) == pytest.approx(5e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_warm_start_trains_only_the_vision_tower_and_lowers_the_loss(tiny_model_dir, bf16):
    torch = pytest.importorskip("torch")
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from models.warmstart import warm_start_vision

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir, backend="pil")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history, token_dtypes = [], set()
    # The tower's output dtype in training steps (the held-out reports run without grad and autocast).
    hook = model.model.visual.register_forward_hook(
        lambda module, args, out: token_dtypes.add(out.pooler_output.dtype) if torch.is_grad_enabled() else None)
    config = WarmStartConfig(steps=16, batch_images=8, warmup_steps=2, lr=2e-3, log_every=100, bf16=bf16)
    warm_start_vision(model, image_processor=processor, config=config, progress=lambda step, losses: history.append(losses))
    hook.remove()
    assert token_dtypes == {torch.bfloat16 if bf16 else torch.float32}
    assert len(history) == 16 and all(set(h) >= {WS_LOSS, WS_OBJECTNESS, WS_CATEGORY, WS_BOX} for h in history)
    # Every step sees new images, so single losses are noisy; where objects are and how far their edges
    # are is learnt first (category takes far longer).
    for name in (WS_OBJECTNESS, WS_BOX):
        assert np.mean([h[name] for h in history[-4:]]) < 0.8 * np.mean([h[name] for h in history[:4]]), name
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name  # autocast computes in bf16; the weights stay fp32
        changed = not torch.equal(param, before[name])
        assert changed == (".visual." in f".{name}"), name


def test_pool_by_coverage_hand_computed():
    torch = pytest.importorskip("torch")
    from models.warmstart import pool_by_coverage

    tokens = torch.tensor([[1.0], [3.0], [5.0], [7.0]])  # 2 images × 2 cells, width 1
    coverage = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    torch.testing.assert_close(pool_by_coverage(tokens, coverage), torch.tensor([[1.0], [6.5]]))


def test_category_losses_join_after_the_configured_share_of_steps():
    from models.warmstart import category_weight_at

    config = WarmStartConfig(steps=100, category_weight=0.5, category_start_fraction=0.3)
    assert [category_weight_at(s, config=config) for s in (0, 29, 30, 99)] == [0.0, 0.0, 0.5, 0.5]
    assert category_weight_at(0, config=WarmStartConfig(category_weight=0.5)) == 0.5  # default: from the start


def test_dense_loss_uses_the_scheduled_category_weight():
    torch = pytest.importorskip("torch")
    from models.warmstart import WS_IMAGE_CATEGORY, DenseHead, category_weight_at, dense_losses

    torch.manual_seed(0)
    head = DenseHead(8, 3)
    tokens = torch.randn(4, 8)  # one image, 2×2 cells
    batch = {"objectness": torch.tensor([1.0, 0.5, 0.0, 0.0]), "category": torch.tensor([2, 2, -1, -1]),
             "box": torch.rand(4, 4), "box_valid": torch.tensor([True, False, False, False]),
             "image_category": torch.tensor([2])}
    config = WarmStartConfig(category_weight=1.0, box_weight=2.0)
    off = dense_losses(head, tokens, batch, config=config, category_weight=0.0)
    on = dense_losses(head, tokens, batch, config=config, category_weight=category_weight_at(0, config=config))
    expected_off = off[WS_OBJECTNESS] + 2.0 * off[WS_BOX]
    torch.testing.assert_close(off[WS_LOSS], expected_off)
    torch.testing.assert_close(on[WS_LOSS], expected_off + on[WS_CATEGORY] + on[WS_IMAGE_CATEGORY])


def test_presence_auc_hand_computed():
    torch = pytest.importorskip("torch")
    from models.warmstart import presence_auc

    scores = torch.tensor([0.9, 0.4, 0.4, 0.1])
    present = torch.tensor([True, True, False, False])
    # Pairs (present, absent): 0.9>0.4, 0.9>0.1, 0.4=0.4 (half), 0.4>0.1 → 3.5 / 4.
    assert presence_auc(scores, present) == pytest.approx(0.875)
    assert math.isnan(presence_auc(scores, torch.ones(4, dtype=torch.bool)))


def test_loader_workers_render_every_step_in_order_from_their_own_streams(tiny_model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoImageProcessor

    from models.warmstart import ImageStream, step_batches

    processor = AutoImageProcessor.from_pretrained(tiny_model_dir, backend="pil")
    # easy_first_fraction 1: the difficulty range widens with every step, so a batch out of order would differ.
    config = WarmStartConfig(steps=6, batch_images=2, image_size=56, easy_first_fraction=1.0)
    inline = list(step_batches(config, image_processor=processor, grid=1))
    loaded = list(step_batches(config.model_copy(update={"loader_workers": 2}), image_processor=processor, grid=1))
    assert len(inline) == len(loaded) == 6
    # Worker w renders steps w, w + 2, w + 4 from its own stream (seed + 1000 (w + 1)); the loader yields step order.
    for worker in (0, 1):
        stream = ImageStream(config=config.model_copy(update={"seed": 1000 * (worker + 1)}), image_processor=processor,
                             grid=1)
        for step in range(worker, 6, 2):
            torch.testing.assert_close(loaded[step]["pixel_values"], stream.batch(step)["pixel_values"])
    assert not torch.equal(loaded[0]["pixel_values"], inline[0]["pixel_values"])  # not the in-loop stream
