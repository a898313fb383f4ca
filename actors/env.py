"""The Chain-of-Focus zoom environment: parse a zoom request → crop the original → next observation.

A model turn that ends in ``<zoom>[x1, y1, x2, y2]</zoom>`` asks to see a region enlarged. The box is
in the run's coordinate frame RELATIVE TO THE IMAGE THE MODEL SAW LAST (the prompt image, or the
previous crop). The environment maps it to original pixels, clamps it into the image and widens it to
at least ``min_crop_side`` pixels a side, crops the ORIGINAL image (never a crop of a crop, so
repeated zooms do not lose resolution), resizes the crop to about ``zoom_pixels`` pixels with sides
that are multiples of 28 (so the processor keeps that size and the crop's ``input`` frame is exactly
the shown size), and returns the tokens of the next user turn: the end of the model's turn, a user
message with the crop's image pads and a sentence giving the crop's size in the run's frame, and the
assistant header. Boxes the model writes after a zoom refer to that crop; ``answer_frame`` gives the
frame of a trajectory's final answer and ``boxes_to_original`` maps boxes back.

Every box conversion goes through ``rewards.frames`` (the one place frames are converted).
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.config import QWEN_CELL, EnvConfig
from actors.types import PromptGroup
from data.prompts import PromptConfig, build_messages, frame_size
from rewards.frames import INPUT, MAX_ASPECT, FrameSpec, smart_resize, to_original
from rewards.parse import box_from_text

ZOOM_STOP = "</zoom>"  # stop string that ends a turn which requests a zoom

# Outcomes of a model turn for the environment.
NO_ZOOM = "no_zoom"  # the turn does not end in a zoom request: the episode is over
ZOOM = "zoom"  # a well-formed request
BAD_ZOOM = "bad_zoom"  # ends in <zoom>…</zoom> but the box is not four finite numbers with x1 <= x2, y1 <= y2

_ZOOM_RE = re.compile(r"<zoom>((?:(?!<zoom>).)*)</zoom>\s*$", re.DOTALL)  # the turn's last zoom, at its end
_ZOOM_END_RE = re.compile(r"</zoom>\s*$")

IMAGE_PAD = "<|image_pad|>"
_SNAP = 1e-6  # slack for float noise before rounding to pixels or cells
# Stands for the assistant's text / the user's text while the chat template renders turn boundaries.
_SENTINEL = "\u2063REFOCUS-SENTINEL\u2063"


@dataclass(frozen=True)
class ImageLimits:
    """How the processor resizes an image (Qwen2.5-VL ``smart_resize``) and how many tokens it becomes."""

    factor: int  # patch_size * merge_size: one image token per factor x factor cell
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, image_processor) -> ImageLimits:
        size = image_processor.size
        min_pixels = getattr(image_processor, "min_pixels", None) or size["shortest_edge"]
        max_pixels = getattr(image_processor, "max_pixels", None) or size["longest_edge"]
        return cls(factor=image_processor.patch_size * image_processor.merge_size,
                   min_pixels=int(min_pixels), max_pixels=int(max_pixels))

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the model input for a width x height image."""
        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return w, h

    def num_tokens(self, width: int, height: int) -> int:
        w, h = self.input_size(width, height)
        return (w // self.factor) * (h // self.factor)


def parse_zoom(text: str) -> tuple[str, list[float] | None]:
    """(outcome, box) of a model turn: ZOOM with the box as written, BAD_ZOOM or NO_ZOOM with None.

    The box is read as the rewards read zoom boxes (``rewards.parse.box_from_text``), so a request served
    here never counts as malformed there. A turn that closes an ``<answer>`` before its zoom has answered:
    its zoom is BAD_ZOOM, not served, so the answer stays in the frame it was written in (``answer_frame``
    reads the final answer in the last served crop's frame)."""
    if not _ZOOM_END_RE.search(text):
        return NO_ZOOM, None
    match = _ZOOM_RE.search(text)
    if match is None or "</answer>" in text[:match.start()]:
        return BAD_ZOOM, None
    box = box_from_text(match.group(1))
    # 309 digits in a row read as inf, which no crop can be cut at (box_from_text refuses it)
    if box is None or box[2] < box[0] or box[3] < box[1]:
        return BAD_ZOOM, None
    return ZOOM, box


def clamp_region(box: Sequence[float], *, width: int, height: int, min_side: int) -> tuple[int, int, int, int]:
    """An original-pixel box as the integer crop region: clamped into the image, outward-rounded,
    and widened about its centre to at least ``min_side`` per side (less only where the image is smaller)."""

    def axis(low: float, high: float, size: int) -> tuple[int, int]:
        # The slack absorbs float noise of frame conversions (147 * 200/196 = 150.00000000000003),
        # which must not widen a crop by a pixel.
        low_i = math.floor(min(max(low, 0.0), size) + _SNAP)
        high_i = math.ceil(min(max(high, 0.0), size) - _SNAP)
        side = min(min_side, size)
        if high_i - low_i < side:
            centre = (low_i + high_i) / 2
            low_i = min(max(math.floor(centre - side / 2), 0), size - side)
            high_i = low_i + side
        return low_i, high_i

    x1, x2 = axis(box[0], box[2], width)
    y1, y2 = axis(box[1], box[3], height)
    return x1, y1, x2, y2


def zoom_region(boxes: Sequence[Sequence[float]], *, width: int, height: int, context: float,
                min_side: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int, int]:
    """The square region (original px) a zoom onto ``boxes`` asks for: its side ``context`` times the
    union's longer side (at least ``min_side``, at most the image's shorter side), centred on the union
    and then moved by ``offset`` (x, y in [-1, 1]) times the room the union leaves on each side, so the
    union stays inside; finally shifted to lie inside the image. Square, so a square image's crop is
    shown at the image's own size; but where the union is wider (or taller) than a square the image can
    hold, the region widens on that axis just enough to hold it (a wide animal in a landscape image), as
    a zoom that cuts the animal would teach a cut box."""
    if not boxes:
        raise ValueError("zoom_region: needs at least one box")
    if context < 1.0:
        raise ValueError(f"zoom_region: context must be >= 1 (the region holds the boxes), got {context}")
    if not all(-1.0 <= v <= 1.0 for v in offset):
        raise ValueError(f"zoom_region: offset must lie in [-1, 1] per axis, got {offset}")
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    side = min(max(math.ceil(max(x2 - x1, y2 - y1) * context - _SNAP), min_side), width, height)
    region_w = max(side, min(math.ceil(x2 - _SNAP) - math.floor(x1 + _SNAP), width))
    region_h = max(side, min(math.ceil(y2 - _SNAP) - math.floor(y1 + _SNAP), height))
    left = (x1 + x2 - region_w) / 2 + offset[0] * max(region_w - (x2 - x1), 0) / 2
    top = (y1 + y2 - region_h) / 2 + offset[1] * max(region_h - (y2 - y1), 0) / 2
    # Rounded to whole pixels, but never past the union's edges (an offset of +-1 puts the region flush with
    # them, where rounding could cut half a pixel); then inside the image, which holds the union too.
    left = min(max(round(left), math.ceil(x2 - _SNAP) - region_w), math.floor(x1 + _SNAP))
    top = min(max(round(top), math.ceil(y2 - _SNAP) - region_h), math.floor(y1 + _SNAP))
    left = min(max(left, 0), width - region_w)
    top = min(max(top, 0), height - region_h)
    return left, top, left + region_w, top + region_h


@functools.lru_cache(maxsize=4096)
def zoom_size(crop_width: int, crop_height: int, *, pixels: int, limits: ImageLimits) -> tuple[int, int]:
    """(width, height) a crop is shown at: whole cells of the processor that it keeps as they are (so the shown
    size IS the input size: between its min and max pixels), at most ``pixels``, and of those the one nearest
    the crop scaled to ``pixels`` in ratio on both sides (the larger on a tie).

    Rounding each side to cells on its own broke both promises: a 40 x 41 crop was shown at 84 x 112 under a
    112 x 112 budget (a quarter of its tokens and of its aspect lost), and where the processor's min and max
    pixels are close (the small model: both 112 x 112) a 60 x 100 crop was shown at 112 x 168, which the
    processor then shrank to 84 x 112, so the model was told one frame and saw another."""
    f = limits.factor
    scale = math.sqrt(pixels / (crop_width * crop_height))
    ideal_w, ideal_h = crop_width * scale / f, crop_height * scale / f  # cells, at exactly the budget
    fewest = max(1, math.ceil(limits.min_pixels / (f * f) - _SNAP))
    most = max(fewest, math.floor(min(pixels, limits.max_pixels) / (f * f) + _SNAP))
    best, best_key = (1, fewest), None
    for w in range(1, most + 1):
        low, high = max(1, math.ceil(fewest / w)), most // w
        if low > high:
            continue
        for h in {min(max(math.floor(ideal_h), low), high), min(max(math.ceil(ideal_h), low), high), low, high}:
            if max(w, h) > MAX_ASPECT * min(w, h):  # the processor refuses such an image
                continue
            key = (max(abs(math.log(w / ideal_w)), abs(math.log(h / ideal_h))), -w * h)
            if best_key is None or key < best_key:
                best, best_key = (w, h), key
    return best[0] * f, best[1] * f


def show_region(image, region: Sequence[int], *, pixels: int, limits: ImageLimits):
    """The crop of ``region`` (original px) as the environment shows it: resized, bicubic, to ``zoom_size``."""
    from PIL import Image

    shown = zoom_size(region[2] - region[0], region[3] - region[1], pixels=pixels, limits=limits)
    return image.crop(tuple(region)).resize(shown, Image.Resampling.BICUBIC)


def crop_frame(kind: str, *, crop_box: Sequence[float], shown_size: tuple[int, int]) -> FrameSpec:
    """The frame of boxes the model writes about a crop of ``crop_box`` (original px) shown at ``shown_size``."""
    crop = tuple(float(v) for v in crop_box)
    if kind == INPUT:
        return FrameSpec(kind=INPUT, input_width=shown_size[0], input_height=shown_size[1], crop=crop)
    return FrameSpec(kind=kind, crop=crop)


def image_frame(kind: str, *, width: int, height: int, limits: ImageLimits) -> FrameSpec:
    """The frame of boxes the model writes about the whole (prompt) image."""
    if kind == INPUT:
        in_w, in_h = limits.input_size(width, height)
        return FrameSpec(kind=INPUT, input_width=in_w, input_height=in_h)
    return FrameSpec(kind=kind)


def answer_frame(*, kind: str, width: int, height: int, zoom_boxes: Sequence[Sequence[float]],
                 limits: ImageLimits, zoom_pixels: int) -> FrameSpec:
    """The frame of a trajectory's final boxes: the last crop's (``Trajectory.zoom_boxes``), else the image's."""
    if not zoom_boxes:
        return image_frame(kind, width=width, height=height, limits=limits)
    x1, y1, x2, y2 = zoom_boxes[-1]
    shown = zoom_size(int(x2 - x1), int(y2 - y1), pixels=zoom_pixels, limits=limits)
    return crop_frame(kind, crop_box=zoom_boxes[-1], shown_size=shown)


def boxes_to_original(boxes: Sequence[Sequence[float]], *, frame: FrameSpec, width: int,
                      height: int) -> list[list[float]]:
    """Boxes written in ``frame`` → ORIGINAL pixels of the width x height image (``rewards.frames.to_original``)."""
    return to_original(boxes, frame=frame, width=width, height=height)


def expand_image_pads(token_ids: Sequence[int], *, counts: Sequence[int], image_pad_id: int) -> list[int]:
    """Replace the i-th single image pad with ``counts[i]`` pads (what the processor does to text)."""
    out: list[int] = []
    k = 0
    for token in token_ids:
        if token == image_pad_id:
            if k >= len(counts):
                raise ValueError(f"more image pads than the {len(counts)} images given")
            out.extend([image_pad_id] * counts[k])
            k += 1
        else:
            out.append(token)
    if k != len(counts):
        raise ValueError(f"{k} image pads for {len(counts)} images")
    return out


def decode_image(data: bytes):
    """RGB PIL image of encoded bytes; ValueError if they do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises several unrelated types for bad bytes
        raise ValueError(f"image bytes do not decode ({error})") from error


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Observation:
    """What the environment inserts after a zoom request."""

    token_ids: list[int]  # end of the model turn + user turn with the crop's pads + assistant header
    image: Any  # PIL image of the crop at its shown size
    crop_box: tuple[int, int, int, int]  # the cropped region, original pixels
    frame: FrameSpec  # frame of the boxes the model writes next


@dataclass
class Episode:
    """The environment's state of one sample: the original image and what the model saw last."""

    image: Any  # original PIL image
    frame: FrameSpec  # frame of the image the model saw last
    zoom_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def advance(self, observation: Observation) -> None:
        """The model is shown ``observation``: boxes it writes now refer to that crop."""
        self.frame = observation.frame
        self.zoom_boxes.append(observation.crop_box)

    @property
    def width(self) -> int:
        return self.image.size[0]

    @property
    def height(self) -> int:
        return self.image.size[1]


class ZoomEnv:
    """Builds the first observation of a prompt and the observation after each zoom request."""

    def __init__(self, *, config: EnvConfig, prompt: PromptConfig, processor):
        self.config = config
        self.prompt_config = prompt
        self.kind = prompt.frame
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.limits = ImageLimits.of(processor.image_processor)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if config.zoom_pixels > self.limits.max_pixels:
            raise ValueError(f"env.zoom_pixels ({config.zoom_pixels}) exceeds the processor's max_pixels "
                             f"({self.limits.max_pixels}): the processor would shrink every crop again")
        if config.zoom_pixels < self.limits.min_pixels:
            raise ValueError(f"env.zoom_pixels ({config.zoom_pixels}) is below the processor's min_pixels "
                             f"({self.limits.min_pixels}): every crop would be shown larger than the budget")
        if self.limits.factor != QWEN_CELL:
            raise ValueError(f"processor cell is {self.limits.factor} px, Qwen2.5-VL's is {QWEN_CELL}")
        self._turn_end_ids, self._user_head, self._user_tail = self._turn_texts()

    def _turn_texts(self) -> tuple[list[int], str, str]:
        """The chat template's text between an assistant turn's content and a user turn's text.

        Rendered with a sentinel, so any template that renders conversations prefix-consistently works
        (Qwen's: ``<|im_end|>\\n`` then ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>``
        TEXT ``<|im_end|>\\n<|im_start|>assistant\\n``).
        """
        base = [{"role": "system", "content": "s"}, {"role": "assistant", "content": _SENTINEL}]
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}
        before = self.processor.apply_chat_template(base, tokenize=False)
        after = self.processor.apply_chat_template(base + [user], tokenize=False, add_generation_prompt=True)
        if not after.startswith(before) or before.count(_SENTINEL) != 1 or after.count(_SENTINEL) != 2:
            raise ValueError("the chat template does not render conversations prefix-consistently")
        turn_end = before.split(_SENTINEL)[1]
        user_head, user_tail = after[len(before):].split(_SENTINEL)
        if user_head.count(IMAGE_PAD) != 1:
            raise ValueError(f"the chat template's user image renders {user_head.count(IMAGE_PAD)} image pads, not 1")
        return self._encode(turn_end), user_head, user_tail

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reset(self, prompt: PromptGroup) -> tuple[list[int], Episode]:
        """Prompt token ids (image pads expanded) and the episode start. ValueError for a corrupt prompt."""
        image = decode_image(prompt.image)
        width, height = image.size
        if (width, height) != (prompt.target.width, prompt.target.height):
            raise ValueError(f"image is {width}x{height}, the row says {prompt.target.width}x{prompt.target.height}")
        frame = image_frame(self.kind, width=width, height=height, limits=self.limits)
        messages = build_messages(question=prompt.question, task=prompt.task, width=width, height=height,
                                  config=self.prompt_config, input_size=self.limits.input_size(width, height))
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = expand_image_pads(self._encode(text), counts=[self.limits.num_tokens(width, height)],
                                image_pad_id=self.image_pad_id)
        return ids, Episode(image=image, frame=frame)

    def step(self, episode: Episode, box: Sequence[float], *, last_token: int | None) -> Observation:
        """Serve a zoom request (``box`` in ``episode.frame``): the crop and the tokens that show it.

        The episode is not changed: the caller commits the observation with ``episode.advance`` once it
        has decided to show it (it may not fit the token budget). ``last_token`` is the model turn's
        last token: if the model already closed its turn with the template's end-of-turn token, it is
        not inserted again.
        """
        original = boxes_to_original([box], frame=episode.frame, width=episode.width, height=episode.height)[0]
        region = clamp_region(original, width=episode.width, height=episode.height, min_side=self.config.min_crop_side)
        crop_w, crop_h = region[2] - region[0], region[3] - region[1]
        image = show_region(episode.image, region, pixels=self.config.zoom_pixels, limits=self.limits)
        shown = image.size
        frame = crop_frame(self.kind, crop_box=region, shown_size=shown)
        frame_w, frame_h = frame_size(self.kind, width=crop_w, height=crop_h, input_size=shown)
        text = (f"This is the region {[round(v) for v in box]} enlarged. From now on, coordinates refer to this "
                f"view: it is {frame_w} wide and {frame_h} high.")
        turn_end = self._turn_end_ids
        if turn_end and last_token == turn_end[0]:
            turn_end = turn_end[1:]
        user = expand_image_pads(self._encode(self._user_head + text + self._user_tail),
                                 counts=[self.limits.num_tokens(*shown)], image_pad_id=self.image_pad_id)
        return Observation(token_ids=turn_end + user, image=image, crop_box=region, frame=frame)
