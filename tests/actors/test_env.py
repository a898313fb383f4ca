"""The zoom environment: pure helpers with hand-computed values, then whole multi-turn rollouts.

The multi-turn rollouts run the real RolloutWorker, tokenizer, chat template and processor settings
of the tiny model, but a SCRIPTED engine: a randomly initialised model never writes the
``<zoom>[..]</zoom>`` grammar, so it cannot drive the environment into a zoom. The scripted engine
implements the same ``RolloutEngine`` contract (tokens, one log-prob per token, stop strings) and
records the requests it receives, so the test can look at exactly what the model would have seen.
"""

from __future__ import annotations

import itertools

import io
import math

import numpy as np
import pytest
from PIL import Image

from actors.config import EnvConfig, RolloutConfig
from actors.engines.base import FINISH_LENGTH, FINISH_STOP, EngineSample, RolloutEngine, truncate_at_stop
from actors.env import (
    BAD_ZOOM,
    NO_ZOOM,
    ZOOM,
    ImageLimits,
    ZoomEnv,
    answer_frame,
    boxes_to_original,
    clamp_region,
    crop_frame,
    expand_image_pads,
    parse_zoom,
    zoom_region,
    zoom_size,
)
from actors.rollout import (
    FINISH_BAD_ZOOM,
    FINISH_TURNS,
    STAT_BAD_ZOOMS,
    STAT_ENV_TOKENS,
    STAT_TOKENS,
    STAT_TURNS,
    STAT_ZOOMS,
    RolloutWorker,
)
from actors.types import PromptGroup, Target
from data.prompts import PromptConfig
from rewards.frames import INPUT, NORM1000, ORIGINAL, FrameSpec
from rewards.parse import parse_completion

LIMITS = ImageLimits(factor=28, min_pixels=56 * 56, max_pixels=224 * 224)  # the tiny model's processor
SCRIPTED_LOGPROB = -0.25
# A 200 x 100 image: the processor shows it at 196 x 112 (smart_resize), so the "input" frame differs
# from original pixels on both axes (x scale 200/196, y scale 100/112).
WIDTH, HEIGHT = 200, 100


# --- pure helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><zoom>[1, 2, 3, 4]</zoom>", (ZOOM, [1.0, 2.0, 3.0, 4.0])),
    ("<think>a</think><zoom>[1.5,2, 3.25 ,4]</zoom>\n", (ZOOM, [1.5, 2.0, 3.25, 4.0])),
    ("<think>a</think><zoom>[3, 3, 3, 3]</zoom>", (ZOOM, [3.0, 3.0, 3.0, 3.0])),  # clamp_region widens it
    ("<think>a</think><zoom>[1, 2, 3]</zoom>", (BAD_ZOOM, None)),
    ("<think>a</think><zoom>[5, 2, 3, 4]</zoom>", (BAD_ZOOM, None)),  # x2 < x1
    ("<think>a</think><zoom>[a, b, c, d]</zoom>", (BAD_ZOOM, None)),
    ("<think>a</think><zoom>[05, 10, 60, 70]</zoom>", (BAD_ZOOM, None)),  # not JSON: the rewards refuse it too
    ("<think>a</think><zoom>[[1, 2, 3, 4]]</zoom>", (ZOOM, [1.0, 2.0, 3.0, 4.0])),  # as the rewards read it
    ("<think>a</think><zoom>[1, 2, 3, 4]</zoom><zoom>[5, 6, 7, 8]</zoom>", (ZOOM, [5.0, 6.0, 7.0, 8.0])),
    # A turn that answered: its zoom is not served, so the answer keeps the frame it was written in.
    ('<think>a</think><answer>{"present": false}</answer><think>b</think><zoom>[1, 2, 3, 4]</zoom>',
     (BAD_ZOOM, None)),
    ("<think>a</think><zoom>[1, 2, 3, 4]</zoom> and more", (NO_ZOOM, None)),  # not the end of the turn
    ('<think>a</think><answer>{"present": false}</answer>', (NO_ZOOM, None)),
    ("", (NO_ZOOM, None)),
])
def test_parse_zoom(text, expected):
    assert parse_zoom(text) == expected


@pytest.mark.parametrize("box, size, expected", [
    ([10, 10, 12, 12], (112, 112), (0, 0, 28, 28)),  # widened about its centre, shifted into the image
    ([100.4, 50.2, 130.7, 90.0], (120, 100), (92, 50, 120, 90)),  # x clipped to 120, then widened left
    ([-5, -5, 300, 300], (120, 100), (0, 0, 120, 100)),  # clamped to the image
    ([2, 2, 5, 5], (20, 100), (0, 0, 20, 28)),  # an image narrower than the minimum side
    ([150, 80, 150, 80], (120, 100), (92, 66, 120, 94)),  # a point right of the image: pushed back in
])
def test_clamp_region(box, size, expected):
    assert clamp_region(box, width=size[0], height=size[1], min_side=28) == expected


@pytest.mark.parametrize("boxes, context, expected", [
    # union 20 x 40, side ceil(40 * 1.5) = 60, centred at (20, 40): left -10 shifted in to 0, top 10
    ([[10, 20, 30, 60]], 1.5, (0, 10, 60, 70)),
    # side max(10 * 2, 28) = 28, centred at (105, 105): pushed back inside to 84
    ([[100, 100, 110, 110]], 2.0, (84, 84, 112, 112)),
    # the union of two boxes: 60 x 30, side 72, centred at (50, 45)
    ([[20, 30, 40, 60], [60, 40, 80, 50]], 1.2, (14, 9, 86, 81)),
    # 150 capped at the image's 112
    ([[0, 0, 100, 50]], 1.5, (0, 0, 112, 112)),
])
def test_zoom_region_is_a_square_around_the_boxes_inside_the_image(boxes, context, expected):
    assert zoom_region(boxes, width=112, height=112, context=context, min_side=28) == expected


@pytest.mark.parametrize("boxes, expected", [
    # 1024 x 768: side 1.5 * 900 = 1350 capped at 768 would cut the box; x widens to the box's 900
    ([[50, 300, 950, 420]], (50, 0, 950, 768)),
    # the same box, fractional: the region's whole pixels still hold it
    ([[50.4, 300, 950.6, 420]], (50, 0, 951, 768)),
    # a box the capped square holds stays in a square: side min(1.5 * 600, 768) = 768
    ([[200, 300, 800, 420]], (116, 0, 884, 768)),
])
def test_zoom_region_widens_where_the_image_cannot_hold_a_square_around_the_boxes(boxes, expected):
    region = zoom_region(boxes, width=1024, height=768, context=1.5, min_side=28)
    assert region == expected
    assert region[0] <= boxes[0][0] and region[2] >= boxes[0][2]


def test_zoom_region_offset_moves_it_within_the_room_the_boxes_leave():
    # side 40 around a 20 x 20 box: 10 px of room each side; x moved right by all of it, y up by all of it
    assert zoom_region([[40, 40, 60, 60]], width=112, height=112, context=2.0, min_side=28,
                       offset=(1.0, -1.0)) == (40, 20, 80, 60)
    with pytest.raises(ValueError, match="offset"):
        zoom_region([[40, 40, 60, 60]], width=112, height=112, context=2.0, min_side=28, offset=(1.5, 0.0))


@pytest.mark.parametrize("offset", [(0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (-1.0, 0.0), (0.7, -0.3)])
def test_zoom_region_holds_the_boxes_whole_at_any_offset(offset):
    # The union's 13 x 102.4 px leave a region of 103 px (context 1) 0.6 px of room in y: rounding a region
    # flush with the union's edge (offset +-1) once cut half a pixel of the animal.
    box = [86.8, 101.6, 99.8, 204.0]
    x1, y1, x2, y2 = zoom_region([box], width=141, height=289, context=1.0, min_side=28, offset=offset)
    assert x1 <= box[0] and y1 <= box[1] and x2 >= box[2] and y2 >= box[3]


def test_zoom_region_needs_boxes_and_a_context_of_at_least_one():
    with pytest.raises(ValueError, match="at least one box"):
        zoom_region([], width=112, height=112, context=1.5, min_side=28)
    with pytest.raises(ValueError, match="context must be >= 1"):
        zoom_region([[0, 0, 10, 10]], width=112, height=112, context=0.9, min_side=28)


@pytest.mark.parametrize("crop, expected", [
    ((50, 50), (224, 224)),  # scale sqrt(50176 / 2500) = 4.48: 224 x 224
    ((28, 112), (112, 448)),  # scale 4: 112 x 448, exactly the budget
    ((100, 30), (420, 112)),  # 14.6 x 4.4 cells: 15 x 4 and 14 x 4 are as near in ratio; the larger
    ((400, 400), (224, 224)),  # a crop larger than the budget is shrunk to it
    # near-square crops keep their aspect and the whole budget (flooring each side alone: 196 x 224, 224 x 196)
    ((50, 51), (224, 224)),
    ((505, 504), (224, 224)),
    # 10.8 x 5.9 cells: 11 x 6 is over the 64; 10 x 6 is within 8 % of both sides, 10 x 5 is 15 % short
    ((55, 30), (280, 168)),
])
def test_zoom_size_fills_the_budget_in_whole_cells(crop, expected):
    w, h = zoom_size(*crop, pixels=224 * 224, limits=LIMITS)
    assert (w, h) == expected
    assert LIMITS.input_size(w, h) == (w, h)  # the processor keeps it: the shown size is the input size


def test_frames_after_a_crop_map_back_to_original_pixels():
    crop = (100, 25, 150, 75)
    shown = crop_frame(INPUT, crop_box=crop, shown_size=(224, 224))
    def to_original(box, frame):
        return boxes_to_original([box], frame=frame, width=WIDTH, height=HEIGHT)[0]

    assert to_original([56, 56, 112, 168], shown) == [112.5, 37.5, 125.0, 62.5]
    norm = crop_frame(NORM1000, crop_box=crop, shown_size=(224, 224))
    assert to_original([0, 0, 500, 1000], norm) == [100.0, 25.0, 125.0, 75.0]
    native = crop_frame(ORIGINAL, crop_box=crop, shown_size=(224, 224))  # crop pixels at native resolution
    assert to_original([10, 5, 20, 15], native) == [110.0, 30.0, 120.0, 40.0]
    assert answer_frame(kind=INPUT, width=WIDTH, height=HEIGHT, zoom_boxes=[[0, 0, 200, 100], list(crop)],
                        limits=LIMITS, zoom_pixels=224 * 224) == shown
    assert answer_frame(kind=INPUT, width=WIDTH, height=HEIGHT, zoom_boxes=[], limits=LIMITS,
                        zoom_pixels=224 * 224) == FrameSpec(kind=INPUT, input_width=196, input_height=112)


def test_expand_image_pads():
    assert expand_image_pads([5, 9, 6, 9, 7], counts=[2, 3], image_pad_id=9) == [5, 9, 9, 6, 9, 9, 9, 7]
    with pytest.raises(ValueError, match="1 image pads for 2 images"):
        expand_image_pads([5, 9], counts=[2, 3], image_pad_id=9)


# --- the environment on the tiny model's processor -----------------------------------------------

@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from models.processor import load_processor

    return load_processor(tiny_model_dir)


def _coordinate_image(width=WIDTH, height=HEIGHT) -> Image.Image:
    """Red grows with x, green with y: a crop's pixels say where in the original they came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _prompt(group_id="g0", image=None) -> PromptGroup:
    image = image or _coordinate_image()
    return PromptGroup(group_id=group_id, prompt_id="p0", task="camo", difficulty="easy",
                       question="Is there a camouflaged animal in this image?", image=_png(image),
                       target=Target(present=True, category="moth", boxes=[[110, 35, 130, 65]],
                                     width=image.size[0], height=image.size[1]), stage=0)


def test_env_step_inserts_the_turn_end_only_when_the_model_did_not_write_it(processor):
    env = ZoomEnv(config=EnvConfig(max_turns=2), prompt=PromptConfig(allow_zoom=True), processor=processor)
    _, episode = env.reset(_prompt())
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = env.step(episode, [98, 28, 147, 84], last_token=5)
    closed = env.step(episode, [98, 28, 147, 84], last_token=im_end)
    assert plain.token_ids[0] == im_end and plain.token_ids[1:] == closed.token_ids
    assert episode.zoom_boxes == [] and episode.frame.crop is None  # step does not change the episode
    episode.advance(plain)
    assert episode.zoom_boxes == [(100, 25, 150, 75)] and episode.frame == plain.frame


@pytest.mark.parametrize(("pixels", "limit"), [(448 * 448, "max_pixels"), (28 * 28, "min_pixels")])
def test_zoom_budget_outside_the_processor_limits_is_rejected(processor, pixels, limit):
    # The tiny processor keeps images between 56 x 56 and 224 x 224 pixels.
    with pytest.raises(ValueError, match=f"env.zoom_pixels .*{limit}"):
        ZoomEnv(config=EnvConfig(max_turns=2, zoom_pixels=pixels), prompt=PromptConfig(allow_zoom=True),
                processor=processor)


# --- multi-turn rollouts through the worker --------------------------------------------------------

class ScriptedEngine(RolloutEngine):
    """Answers with scripted texts (see the module docstring for why). ``script(turn, sample)`` gives
    the text of a model turn; the turn is the number of images in the request (1 + zooms so far)."""

    def __init__(self, tokenizer, script):
        self.tokenizer = tokenizer
        self.script = script
        self.requests = []  # every request received, in order

    def generate(self, requests, *, n, temperature, top_p, max_tokens, stop=(), seed=None):
        limits = [max_tokens] * len(requests) if isinstance(max_tokens, int) else list(max_tokens)
        results = []
        for request, limit in zip(requests, limits):
            self.requests.append(request)
            samples = []
            for j in range(n):
                text, _ = truncate_at_stop(self.script(len(request.images), j), stop)
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                finish = FINISH_STOP if len(tokens) <= limit else FINISH_LENGTH
                tokens = tokens[:limit]
                samples.append(EngineSample(token_ids=tokens, logprobs=[SCRIPTED_LOGPROB] * len(tokens),
                                            text=self.tokenizer.decode(tokens), finish_reason=finish))
            results.append(samples)
        return results

    def load_weights(self, named_tensors, *, version):
        raise NotImplementedError("a scripted engine has no weights")

    @property
    def weight_version(self):
        return 7

    def weights_checksum(self):
        raise NotImplementedError("a scripted engine has no weights")


ZOOM_TURN = "<think>Something breaks the pattern on the right.</think><zoom>[98, 28, 147, 84]</zoom>"
ANSWER_TURN = ('<think>A moth.</think>'
               '<answer>{"present": true, "category": "moth", "boxes": [[56, 56, 112, 168]]}</answer>')
DIRECT_ANSWER = '<think>Nothing.</think><answer>{"present": false, "category": null, "boxes": []}</answer>'


def _worker(tiny_model_dir, processor, script, *, max_turns=2, n=2, **env):
    config = RolloutConfig.model_validate({
        "engine": {},
        "sampling": {"n": n, "max_tokens": 200},
        "env": {"max_turns": max_turns, **env},
        "prompt": {"frame": "input", "allow_zoom": max_turns > 1},
    })
    return RolloutWorker(config=config, model_path=str(tiny_model_dir), worker_id="w-test", engine=ScriptedEngine(processor.tokenizer, script))


def test_zoom_shows_the_crop_masks_the_inserted_turn_and_maps_the_answer_back(tiny_model_dir, processor):
    # Sample 0 zooms then answers in the crop's frame; sample 1 answers directly.
    def script(turn, j):
        if turn == 1:
            return ZOOM_TURN if j == 0 else DIRECT_ANSWER
        return ANSWER_TURN

    worker = _worker(tiny_model_dir, processor, script)
    [group] = worker.generate_groups([_prompt()])
    engine, tokenizer = worker.engine, worker.env.tokenizer
    zoomed, direct = group.trajectories
    assert group.policy_version == 7 and group.worker_id == "w-test"

    # The second request is the first sample's exact tokens plus the environment turn, with the crop.
    first, second = engine.requests
    assert len(engine.requests) == 2 and len(second.images) == 2
    region = (100, 25, 150, 75)  # [98, 28, 147, 84] in the 196 x 112 input frame of a 200 x 100 image
    expected_crop = _coordinate_image().crop(region).resize((224, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(second.images[1]), np.asarray(expected_crop))
    crop = np.asarray(second.images[1]).astype(float)
    # Its pixels come from the region: red says x, green says y (to within bicubic interpolation).
    assert crop[112, 112, 0] == pytest.approx(125 * 255 / (WIDTH - 1), abs=2)
    assert crop[112, 112, 1] == pytest.approx(50 * 255 / (HEIGHT - 1), abs=3)
    assert crop[:, :, 0].min() >= 99 * 255 / (WIDTH - 1) - 2 and crop[:, :, 0].max() <= 150 * 255 / (WIDTH - 1) + 2

    turn1 = tokenizer(ZOOM_TURN, add_special_tokens=False)["input_ids"]
    turn2 = tokenizer(ANSWER_TURN, add_special_tokens=False)["input_ids"]
    env_tokens = second.prompt_ids[len(first.prompt_ids) + len(turn1):]
    assert second.prompt_ids == first.prompt_ids + turn1 + env_tokens
    env_text = tokenizer.decode(env_tokens)
    assert env_text.startswith("<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert env_text.endswith("it is 224 wide and 224 high.<|im_end|>\n<|im_start|>assistant\n")
    assert env_tokens.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 64  # 224 px: 8 x 8 cells

    # The trajectory: model tokens trained on, inserted tokens masked with log-prob 0.
    assert zoomed.completion_ids == turn1 + env_tokens + turn2
    assert zoomed.loss_mask == [1] * len(turn1) + [0] * len(env_tokens) + [1] * len(turn2)
    assert zoomed.behaviour_logprobs == ([SCRIPTED_LOGPROB] * len(turn1) + [0.0] * len(env_tokens)
                                         + [SCRIPTED_LOGPROB] * len(turn2))
    assert zoomed.prompt_ids == first.prompt_ids
    assert zoomed.completion_text == ZOOM_TURN + ANSWER_TURN
    assert zoomed.zoom_boxes == [[100.0, 25.0, 150.0, 75.0]] and zoomed.finish_reason == FINISH_STOP
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(zoomed.zoom_images[0]))), np.asarray(expected_crop))
    assert direct.zoom_boxes == [] and direct.loss_mask == [1] * len(direct.completion_ids)

    # The final box, written in the crop's frame, lands in original pixels.
    answer = parse_completion(zoomed.completion_text).answer
    frame = answer_frame(kind=INPUT, width=WIDTH, height=HEIGHT, zoom_boxes=zoomed.zoom_boxes,
                         limits=worker.env.limits, zoom_pixels=worker.config.env.zoom_pixels)
    assert boxes_to_original(answer.boxes, frame=frame, width=WIDTH, height=HEIGHT) == [[112.5, 37.5, 125.0, 62.5]]

    stats = worker.stats()
    assert stats[STAT_ZOOMS] == 1 and stats[STAT_TURNS] == 3
    assert stats[STAT_TOKENS] == len(turn1) + len(turn2) + len(direct.completion_ids)
    assert stats[STAT_ENV_TOKENS] == len(env_tokens)


def test_a_second_zoom_is_relative_to_the_first_crop(tiny_model_dir, processor):
    # Zoom 1: region (100, 25, 150, 75) shown at 224 px. Zoom 2, in that view: [0, 0, 112, 112] is the
    # crop's top-left quarter (100, 25, 125, 50), 25 px a side, widened to 28 about its centre.
    script = {1: ZOOM_TURN, 2: "<think>Closer.</think><zoom>[0, 0, 112, 112]</zoom>", 3: ANSWER_TURN}
    worker = _worker(tiny_model_dir, processor, lambda turn, j: script[turn], max_turns=3, n=1)
    [group] = worker.generate_groups([_prompt()])
    [trajectory] = group.trajectories
    assert trajectory.zoom_boxes == [[100.0, 25.0, 150.0, 75.0], [98.0, 23.0, 126.0, 51.0]]
    third = worker.engine.requests[-1]
    assert len(third.images) == 3
    # Both crops are cut from the ORIGINAL image, not from each other.
    expected = _coordinate_image().crop((98, 23, 126, 51)).resize((224, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(third.images[2]), np.asarray(expected))
    assert trajectory.loss_mask.count(0) == len(trajectory.completion_ids) - sum(trajectory.loss_mask) > 0
    answer = parse_completion(trajectory.completion_text).answer
    frame = answer_frame(kind=INPUT, width=WIDTH, height=HEIGHT, zoom_boxes=trajectory.zoom_boxes,
                         limits=worker.env.limits, zoom_pixels=worker.config.env.zoom_pixels)
    assert boxes_to_original(answer.boxes, frame=frame, width=WIDTH, height=HEIGHT) == [[105.0, 30.0, 112.0, 44.0]]


def test_zoom_on_the_last_turn_ends_with_turns(tiny_model_dir, processor):
    worker = _worker(tiny_model_dir, processor, lambda turn, j: ZOOM_TURN, max_turns=2, n=1)
    [trajectory] = worker.generate_groups([_prompt()])[0].trajectories
    assert trajectory.finish_reason == FINISH_TURNS
    assert len(trajectory.zoom_boxes) == 1  # the first zoom was served, the second was not
    assert trajectory.loss_mask[-1] == 1  # it ends with the model's own (unanswered) request


def test_a_malformed_zoom_ends_the_sample_and_is_counted(tiny_model_dir, processor):
    worker = _worker(tiny_model_dir, processor, lambda turn, j: "<think>x</think><zoom>[1, 2]</zoom>", n=1)
    [trajectory] = worker.generate_groups([_prompt()])[0].trajectories
    assert trajectory.finish_reason == FINISH_BAD_ZOOM and trajectory.zoom_boxes == []
    assert worker.stats()[STAT_BAD_ZOOMS] == 1 and len(worker.engine.requests) == 1


@pytest.mark.parametrize("box", ["[05, 10, 60, 70]", "[1e1, 2, 30, 40]", "[[10, 20, 30, 40]]", "[10, 20, 30]"])
def test_the_environment_serves_a_zoom_exactly_when_the_rewards_read_its_box(box):
    text = f"<think>a</think><zoom>{box}</zoom>"
    served = parse_zoom(text)[0] == ZOOM
    strict = parse_completion(text + '<think>b</think><answer>{"present": false}</answer>', lenient=False)
    assert served == (strict.strict_violation is None)


def test_an_answer_before_a_zoom_ends_the_sample_in_the_answers_frame(tiny_model_dir, processor):
    # Served, the zoom would have put the answer (about the whole image) in the crop's frame.
    turn = ANSWER_TURN.rstrip() + ZOOM_TURN
    worker = _worker(tiny_model_dir, processor, lambda turn_index, j: turn, n=1)
    [trajectory] = worker.generate_groups([_prompt()])[0].trajectories
    assert trajectory.finish_reason == FINISH_BAD_ZOOM and trajectory.zoom_boxes == []
    assert len(worker.engine.requests) == 1


def test_a_zoom_that_does_not_fit_the_completion_budget_ends_with_length(tiny_model_dir, processor):
    # The environment turn alone is 64 image pads plus about 40 text tokens: 60 tokens cannot hold it.
    worker = _worker(tiny_model_dir, processor, lambda turn, j: ZOOM_TURN if turn == 1 else ANSWER_TURN, n=1,
                     max_completion_tokens=60)
    [trajectory] = worker.generate_groups([_prompt()])[0].trajectories
    assert trajectory.finish_reason == FINISH_LENGTH and trajectory.zoom_boxes == []
    assert set(trajectory.loss_mask) == {1} and len(trajectory.completion_ids) <= 60


def test_corrupt_prompts_are_counted_and_skipped(tiny_model_dir, processor):
    worker = _worker(tiny_model_dir, processor, lambda turn, j: DIRECT_ANSWER, n=1)
    bad = _prompt("bad")
    bad.image = b"not an image"
    wrong_size = _prompt("wrong-size")
    wrong_size.target.width = 300
    groups = worker.generate_groups([bad, _prompt("good"), wrong_size])
    assert [g.group_id for g in groups] == ["good"]
    assert worker.stats()["rollout/bad_prompts"] == 2


def test_the_prompt_tells_the_model_its_frame_and_image_tokens_match_the_processor(tiny_model_dir, processor):
    worker = _worker(tiny_model_dir, processor, lambda turn, j: DIRECT_ANSWER, n=1)
    [group] = worker.generate_groups([_prompt()])
    prompt_ids = group.trajectories[0].prompt_ids
    text = processor.tokenizer.decode(prompt_ids)
    assert "it is 196 pixels wide and 112 pixels high" in text and "<zoom>" in text
    grid = processor.image_processor(images=[_coordinate_image()], return_tensors="pt")["image_grid_thw"]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert prompt_ids.count(pad) == math.prod(grid[0].tolist()) // 4 == 28  # 7 x 4 merged cells of 196 x 112


def test_a_near_square_zoom_is_shown_square_with_every_token_of_the_budget():
    limits = ImageLimits(factor=28, min_pixels=12544, max_pixels=12544)  # small-cpu's
    for crop in [(40, 40), (40, 41), (41, 40), (39, 41)]:
        assert zoom_size(*crop, pixels=12544, limits=limits) == (112, 112), crop


@pytest.mark.parametrize("limits, pixels", [
    (ImageLimits(factor=28, min_pixels=12544, max_pixels=12544), 12544),  # small-cpu: every image is 16 tokens
    (LIMITS, 224 * 224),
    (ImageLimits(factor=28, min_pixels=3136, max_pixels=1003520), 1003520),  # Qwen2.5-VL's defaults
])
def test_a_crop_is_shown_at_a_size_the_processor_keeps(limits, pixels):
    """The shown size is the frame the model is told; the processor must not resize it again. With min and
    max pixels both 112 x 112, a 60 x 100 crop was shown at 112 x 168 and the processor made it 84 x 112."""
    sides = [1, 3, 28, 40, 41, 60, 100, 112, 505, 1000, 5000]
    for width, height in itertools.product(sides, sides):
        if max(width, height) > 200 * min(width, height):
            continue
        shown = zoom_size(width, height, pixels=pixels, limits=limits)
        assert limits.input_size(*shown) == shown, (width, height, shown)
        assert shown[0] * shown[1] <= max(pixels, limits.min_pixels)
    assert zoom_size(60, 100, pixels=12544, limits=ImageLimits(factor=28, min_pixels=12544, max_pixels=12544)) \
        == (112, 112)  # 16 cells: 4 x 4 is nearer a 3.1 x 5.2 ideal than 2 x 8
