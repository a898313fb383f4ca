"""Adversarial completions through the zoom environment and the reward path: nothing breaks a run.

The completions come from hypothesis: garbage, endless text, zoom requests with junk, huge, negative,
inverted or degenerate boxes, nested and repeated tags, thousands of boxes. They drive the REAL
RolloutWorker (zoom environment, tiny model's tokenizer, chat template and processor settings) through
a scripted engine, because a random-init model never writes these texts on purpose (the scripted
engine keeps the engine contract: tokens, one log-prob each, stop strings, per-turn token limits).
The trajectories then take the driver's reward path: ``requests_for_groups`` → ``RewardWorker`` (with
each trajectory's answer frame) → ``merge_batches`` → ``apply_rewards``.

Asserted for every example: no exception; the budgets bound the work (tokens per turn, per
completion and per context, turns per sample); zoom crops lie inside the image; every reward
component is finite and inside its documented range and the total is the weighted sum. Texts that
never go through rollout limits (megabytes, thousands of boxes) go straight to the reward worker and
``parse_zoom``: they fail fast with a counted reason.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from actors.config import RolloutConfig
from actors.engines.base import FINISH_LENGTH, FINISH_STOP, EngineSample, RolloutEngine, truncate_at_stop
from actors.env import BAD_ZOOM, NO_ZOOM, ZOOM, ImageLimits, answer_frame, parse_zoom
from actors.reward import RewardWorker, apply_rewards, merge_batches, requests_for_groups
from actors.rollout import FINISH_BAD_ZOOM, FINISH_TURNS, STAT_BAD_PROMPTS, RolloutWorker
from actors.types import PromptGroup, Target
from rewards.components import RANGES
from rewards.config import RewardConfig
from rewards.parse import ParseFailure

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAMES = ("input", "norm1000", "original")
MAX_TURNS = 3
MAX_TOKENS = 64  # per model turn
MAX_COMPLETION = 400  # model + environment tokens of one sample
MAX_MODEL_LEN = 1024
N = 2
STAGE_WEIGHTS = {0: {"format": 1.0, "presence": 1.0, "category": 1.0, "iou": 2.0, "confidence": 0.5,
                     "overlong": 1.0}}
IMAGE_SIZES = [(200, 100), (37, 250), (112, 112)]


class ScriptedEngine(RolloutEngine):
    """Returns ``texts[(call, sample)]`` (cycled); the engine contract otherwise (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts: list[str] = [""]
        self.calls = 0

    def generate(self, requests, *, n, temperature, top_p, max_tokens, stop=(), seed=None):
        limits = [max_tokens] * len(requests) if isinstance(max_tokens, int) else list(max_tokens)
        results = []
        for r, limit in enumerate(limits):
            samples = []
            for j in range(n):
                text = self.texts[(self.calls * 7 + r * 3 + j) % len(self.texts)]
                text, _ = truncate_at_stop(text, stop)
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                finish = FINISH_STOP if len(tokens) <= limit else FINISH_LENGTH
                tokens = tokens[:limit]
                samples.append(EngineSample(token_ids=tokens, logprobs=[-0.5] * len(tokens),
                                            text=self.tokenizer.decode(tokens), finish_reason=finish))
            results.append(samples)
        self.calls += 1
        return results

    def load_weights(self, named_tensors, *, version):
        raise NotImplementedError("a scripted engine has no weights")

    @property
    def weight_version(self):
        return 3

    def weights_checksum(self):
        raise NotImplementedError("a scripted engine has no weights")


# --- adversarial texts ---------------------------------------------------------------------------------

big_numbers = ["1" * 400, "-" + "9" * 400, "1e400", "0", "-0", "00000000000000000001", "3.5", "-7", "٣", "1.", ".5",
               "nan", "inf", "NaN", "1_000"]
number = st.one_of(st.sampled_from(big_numbers), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


@st.composite
def zoom_request(draw) -> str:
    values = draw(st.lists(number, min_size=0, max_size=6))
    sep = draw(st.sampled_from([",", ", ", " ,", ";", ",,"]))
    body = draw(st.sampled_from(["[{}]", "{}", "[[{}]]", "[{}", "({})"])).format(sep.join(values))
    wrap = draw(st.sampled_from(["<zoom>{}</zoom>", "<zoom><zoom>{}</zoom></zoom>", "<zoom> {} </zoom>\n",
                                 "<zoom>{}</zoom><zoom>[1,2,3,4]</zoom>", "<zoom>{}", "{}</zoom>",
                                 "<think>x</think><zoom>{}</zoom>"]))
    return wrap.format(body)


def _answer(boxes: int, rng_seed: int) -> str:
    rng = np.random.default_rng(rng_seed)
    box_list = rng.uniform(-50, 300, (boxes, 4)).round(1).tolist()
    return json.dumps({"present": True, "category": "moth", "boxes": box_list})


def _grid_answer(boxes: int) -> str:
    """An answer with ``boxes`` short integer boxes (~18 characters each)."""
    grid = [[i % 90, i % 40, i % 90 + 9, i % 40 + 9] for i in range(boxes)]
    return json.dumps({"present": True, "category": "moth", "boxes": grid}, separators=(",", ":"))


fragment = st.one_of(
    st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<focus>", "</focus>", "<zoom>", "</zoom>",
                     "<|im_end|>", "<|im_start|>", "<|image_pad|>", "<|vision_start|>", "{", "}", "[", "]", "\n",
                     '"boxes": [[1, 2, 3, 4]]', "\u0000", "\U0001f98b"]),
    st.text(max_size=10), number,
)
completion = st.one_of(
    st.lists(fragment, max_size=30).map("".join),  # garbage
    zoom_request(),
    st.builds("<think>{}</think>{}".format, st.text(max_size=20), zoom_request()),
    st.integers(1, 5000).map(lambda n: "word " * n),  # endless text: cut by the token limits
    st.builds(lambda n, seed: f"<think>many</think><answer>{_answer(n, seed)}</answer>",
              st.sampled_from([1, 3, 150, 3000]), st.integers(0, 9)),
    st.just('<think>a</think><answer>{"present": false, "category": null, "boxes": []}</answer>'),
    st.just("<think>Look closer.</think><zoom>[10, 10, 60, 50]</zoom>"),  # a well-formed zoom, for contrast
)


# --- the worker ---------------------------------------------------------------------------------------------

def _png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(width * height)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _prompt(i: int, size: tuple[int, int], question: str = "Is there a camouflaged animal?") -> PromptGroup:
    w, h = size
    return PromptGroup(group_id=f"g{i}#1", prompt_id=f"g{i}", task="camo", difficulty="hard", question=question,
                       image=_png(w, h), target=Target(present=True, category="moth",
                                                       boxes=[[w * 0.2, h * 0.3, w * 0.6, h * 0.7]], width=w, height=h),
                       stage=0)


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    """One RolloutWorker per coordinate frame, on the tiny model's processor with a scripted engine."""
    from models.processor import load_processor

    processor = load_processor(tiny_model_dir)
    out = {}
    for frame in FRAMES:
        config = RolloutConfig.model_validate({
            "engine": {"max_model_len": MAX_MODEL_LEN},
            "sampling": {"n": N, "max_tokens": MAX_TOKENS},
            "env": {"max_turns": MAX_TURNS, "max_completion_tokens": MAX_COMPLETION},
            "prompt": {"frame": frame, "allow_zoom": True},
        })
        worker = RolloutWorker(config=config, model_path=str(tiny_model_dir), worker_id=f"fuzz-{frame}",
                               engine=ScriptedEngine(processor.tokenizer))
        limits = ImageLimits.of(processor.image_processor)
        rewards = RewardWorker(RewardConfig.model_validate({
            "frame": {"kind": frame, "min_pixels": limits.min_pixels, "max_pixels": limits.max_pixels},
            "overlong": {"l_max": MAX_COMPLETION, "l_cache": 100}}))
        out[frame] = (worker, rewards, limits)
    return out


def _score(groups, *, rewards: RewardWorker, frame: str, limits: ImageLimits, zoom_pixels: int):
    """The driver's reward path (deploy.reward_pool.RewardPool.submit / take), without Ray."""
    frames = [None if not t.zoom_boxes else answer_frame(kind=frame, width=g.prompt.target.width,
                                                        height=g.prompt.target.height, zoom_boxes=t.zoom_boxes,
                                                        limits=limits, zoom_pixels=zoom_pixels)
              for g in groups for t in g.trajectories]
    parts = []
    for rows, request in requests_for_groups(groups, stage_weights=STAGE_WEIGHTS, frames=frames):
        parts.append((rows, rewards.score_request(request)))
    batch = merge_batches(parts, total=sum(len(g.trajectories) for g in groups))
    apply_rewards(groups, batch)
    return batch


@FUZZ
@given(texts=st.lists(completion, min_size=1, max_size=6), frame=st.sampled_from(FRAMES))
def test_adversarial_completions_through_the_zoom_environment_and_rewards(workers, texts, frame):
    worker, rewards, limits = workers[frame]
    worker.engine.texts = texts
    prompts = [_prompt(i, size) for i, size in enumerate(IMAGE_SIZES)]
    groups = worker.generate_groups(prompts)
    assert [g.group_id for g in groups] == [p.group_id for p in prompts]

    for group in groups:
        w, h = group.prompt.target.width, group.prompt.target.height
        for t in group.trajectories:
            assert len(t.completion_ids) == len(t.loss_mask) == len(t.behaviour_logprobs) <= MAX_COMPLETION
            assert len(t.prompt_ids) + len(t.completion_ids) <= MAX_MODEL_LEN
            assert len(t.zoom_images) == len(t.zoom_boxes) <= MAX_TURNS - 1
            assert t.finish_reason in (FINISH_STOP, FINISH_LENGTH, FINISH_TURNS, FINISH_BAD_ZOOM)
            event(f"zooms served: {len(t.zoom_boxes)}; finish: {t.finish_reason}")
            for x1, y1, x2, y2 in t.zoom_boxes:  # crops lie inside the original image
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            # each model turn stays within its token budget: masked runs of model tokens
            runs = "".join(map(str, t.loss_mask)).split("0")
            assert all(len(run) <= MAX_TOKENS for run in runs)

    batch = _score(groups, rewards=rewards, frame=frame, limits=limits, zoom_pixels=worker.config.env.zoom_pixels)
    weights = STAGE_WEIGHTS[0]
    for group in groups:
        for t in group.trajectories:
            assert math.isfinite(t.reward)
            for name, value in t.rewards.items():
                low, high = RANGES[name]
                assert math.isfinite(value) and low <= value <= high, (name, value, t.completion_text)
            assert t.reward == pytest.approx(sum(w * t.rewards.get(name, 0.0) for name, w in weights.items()))
    assert all(f is None or isinstance(f, str) for f in batch.failures)
    for failure in batch.failures:
        event(f"parse failure: {failure}")


@FUZZ
@given(text=st.one_of(completion, st.lists(fragment, max_size=200).map("".join)))
def test_parse_zoom_returns_a_usable_box_or_none(text):
    outcome, box = parse_zoom(text)
    assert outcome in (NO_ZOOM, ZOOM, BAD_ZOOM)
    if outcome == ZOOM:
        assert len(box) == 4 and all(math.isfinite(v) for v in box) and box[0] <= box[2] and box[1] <= box[3]
    else:
        assert box is None


huge = st.floats(min_value=-1.7e308, max_value=1.7e308)
coordinate = st.one_of(huge, st.floats(-300, 3500), st.sampled_from([0.0, -0.0, 5e-324, 1e308, -1e308]))


@FUZZ
@given(frame=st.sampled_from(FRAMES), size=st.sampled_from(IMAGE_SIZES + [(3000, 40), (30, 2900)]),
       xs=st.lists(coordinate, min_size=2, max_size=2).map(sorted),
       ys=st.lists(coordinate, min_size=2, max_size=2).map(sorted), zoom_first=st.booleans())
def test_any_box_parse_zoom_accepts_gives_a_crop_inside_the_image(workers, frame, size, xs, ys, zoom_first):
    """Boxes of any finite size, in every frame, on wide and tall images (whose input frame is shrunk, so
    coordinates grow when mapped back), after a first zoom or not: the crop is cut inside the image."""
    env = workers[frame][0].env
    _, episode = env.reset(_prompt(0, size))
    if zoom_first:
        episode.advance(env.step(episode, [0.0, 0.0, 30.0, 30.0], last_token=None))
    box = [xs[0], ys[0], xs[1], ys[1]]
    text = f"<think>t</think><zoom>[{', '.join(np.format_float_positional(v, trim='-') for v in box)}]</zoom>"
    outcome, parsed = parse_zoom(text)  # as the model would write it: plain decimals, no exponent
    assert outcome == ZOOM and parsed == box
    observation = env.step(episode, parsed, last_token=None)
    x1, y1, x2, y2 = observation.crop_box
    assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
    assert observation.image.size[0] >= 28 and observation.image.size[1] >= 28


@pytest.mark.parametrize("box", [["1" * 400, "0", "5", "5"], ["-" + "9" * 400, "0", "5", "5"],
                                 ["0", "0", "9" * 309, "9" * 309]])
def test_a_zoom_box_too_big_for_a_float_is_a_bad_zoom(box):
    """309 digits read as inf: no crop can be cut there, so the request is malformed (the sample ends)."""
    assert parse_zoom(f"<think>t</think><zoom>[{', '.join(box)}]</zoom>") == (BAD_ZOOM, None)


@pytest.mark.parametrize("text, reason", [
    ("<think>" + "a" * 2_000_000 + "</think><answer>{}</answer>", ParseFailure.TOO_LONG),  # endless text
    (f"<think>x</think><answer>{_grid_answer(1500)}</answer>", ParseFailure.TOO_MANY_BOXES),  # under max_chars
    ("<think>x</think>" + "<zoom>[1, 2, 3, 4]</zoom>" * 1000, ParseFailure.NO_ANSWER_TAG),
    ("<answer>" * 10000 + "</answer>" * 10000, None),  # nested tags: any failure but a crash
    ("\x00" * 100_000, None),
])
def test_huge_completions_fail_fast_with_a_counted_reason(text, reason):
    """What rollout budgets would never let through still cannot hurt the reward worker or the environment."""
    worker = RewardWorker(RewardConfig())
    target = Target(present=True, category="moth", boxes=[[10, 10, 50, 50]], width=112, height=112)
    result = worker.score([text], [target], weights={"format": 1.0, "iou": 1.0, "category": 1.0})
    assert result.failures[0] is not None
    if reason is not None:
        assert result.failures[0] == reason.value
    assert math.isfinite(result.totals[0]) and result.totals[0] == 0.0
    assert worker.stats()[f"reward/parse_failure/{result.failures[0]}"] == 1
    assert parse_zoom(text)[0] in (NO_ZOOM, ZOOM, BAD_ZOOM)


def test_a_prompt_too_long_for_the_context_is_skipped_not_fatal(workers):
    """An overlong question (corrupt data) skips that prompt; the rest of the call is served."""
    worker, _, _ = workers["input"]
    worker.engine.texts = ["<think>a</think><answer>{}</answer>"]
    before = worker.stats().get(STAT_BAD_PROMPTS, 0.0)
    prompts = [_prompt(0, (112, 112)), _prompt(1, (112, 112), question="why " * 3000), _prompt(2, (64, 64))]
    groups = worker.generate_groups(prompts)
    assert [g.group_id for g in groups] == ["g0#1", "g2#1"]
    assert worker.stats()[STAT_BAD_PROMPTS] == before + 1
