"""Prompts: row questions, chat messages stating the answer grammar and coordinate frame, demos.

Split of responsibilities:
  * ``question_for`` builds the task question stored in each data set row (frame-free, because the
    frame and the model's input size are only known when a run is configured);
  * ``build_messages`` wraps a row's question into Qwen2.5-VL chat messages whose system part states
    the grammar ``<think>…</think><answer>{json}</answer>``, the coordinate frame with the image size
    in that frame and, optionally, in-context trajectory demonstrations in the Visual Refocus style
    (Overview → Focus → Rethink → Backtracing → Summary) with ``<focus>[..]</focus>`` boxes;
  * ``target_completion`` writes the ideal completion for a row (SFT targets).

Frames: "original" (data set pixels), "input" (pixels of the processor-resized model input, the
Qwen2.5-VL convention; the caller passes that size), "norm1000" (0–1000 on both axes).
The only conversion here is original → frame, for targets and demos; turning a model's answer back
into original pixels is the rewards package's job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.think import brief_think

Frame = Literal["original", "input", "norm1000"]
FRAMES: tuple[str, ...] = ("original", "input", "norm1000")
NORM1000_SIZE = 1000

UnitBox = tuple[float, float, float, float]  # a box as fractions of the image side, for demos


class PromptConfig(BaseModel):
    """How prompts are rendered for a run."""

    model_config = ConfigDict(extra="forbid")

    frame: Frame = Field(
        default="input", description="coordinate frame that boxes in prompts and answers use",
    )
    n_demos: int = Field(
        default=0, ge=0, le=4, description="in-context trajectory demonstrations placed in the system message",
    )
    allow_zoom: bool = Field(
        default=False, description="describe the <zoom>[box]</zoom> tool call that ends a turn",
    )
    system: Literal["full", "brief", "omit"] = Field(
        default="full",
        description="full: role, grammar, frame and focus hints (for models that read instructions); brief: "
        "two sentences, for small models trained on this task (~25 tokens instead of ~250 in every sequence); "
        "omit: an empty system message, for a model trained from scratch on this one task, to which the text "
        "says nothing it does not learn anyway (the builtin tokenizer spends 65 tokens on the brief one)",
    )

    question: Literal["row", "omit"] = Field(
        default="row",
        description="row: the user turn is the image and the row's question; omit: the image alone, for a model "
        "trained from scratch on one task whose question never changes (55 tokens fewer per sequence, builtin tokenizer)",
    )

    @model_validator(mode="after")
    def _demos_only_in_the_full_text(self) -> PromptConfig:
        if self.system != "full" and self.n_demos:
            raise ValueError(f"system: {self.system} carries no demonstrations (set n_demos 0)")
        return self


def question_for(task: str, *, category: str | None = None, phrase: str | None = None,
                 categories: Sequence[str] | None = None) -> str:
    """The row question of one task. ``categories``, when given, is listed as the answer vocabulary.

    detect needs ``category`` (what to find); ground needs ``phrase`` (the referring expression).
    """
    vocabulary = f" Possible animals: {', '.join(categories)}." if categories else ""
    if task == "camo":
        return "Is there a camouflaged animal in this image? If there is, what is it and where is it?" + vocabulary
    if task == "classify":
        return "Which camouflaged animal is hidden in this image, if any?" + vocabulary
    if task == "detect":
        if not category:
            raise ValueError("category: a detect question names the category to find")
        return f"Find every {category} in this image and give one box for each."
    if task == "ground":
        if not phrase:
            raise ValueError("phrase: a ground question needs a referring phrase")
        return f"Locate {phrase} in this image."
    raise ValueError(f"task: unknown {task!r} (expected camo, classify, detect or ground)")


def frame_size(frame: str, *, width: int, height: int,
               input_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) of the image measured in ``frame``; ``input_size`` is (w, h) of the model input."""
    if frame == "original":
        return width, height
    if frame == "input":
        if input_size is None:
            raise ValueError("input_size: required for frame 'input' (the processor-resized (width, height))")
        return int(input_size[0]), int(input_size[1])
    if frame == "norm1000":
        return NORM1000_SIZE, NORM1000_SIZE
    raise ValueError(f"frame: unknown {frame!r} (expected one of {FRAMES})")


def box_to_frame(box: Sequence[float], *, frame: str, width: int, height: int,
                 input_size: tuple[int, int] | None = None) -> list[int]:
    """An original-pixel box as integers in ``frame`` (round half up, clamped, at least 1 unit wide)."""
    frame_w, frame_h = frame_size(frame, width=width, height=height, input_size=input_size)
    x1, x2 = _scale_pair(box[0], box[2], factor=frame_w / width, limit=frame_w)
    y1, y2 = _scale_pair(box[1], box[3], factor=frame_h / height, limit=frame_h)
    return [x1, y1, x2, y2]


def _scale_pair(low: float, high: float, *, factor: float, limit: int) -> tuple[int, int]:
    a = min(max(math.floor(low * factor + 0.5), 0), limit)
    b = min(max(math.floor(high * factor + 0.5), 0), limit)
    if b <= a:  # a box of a pixel or two can collapse when the frame is coarser than the image
        b = min(a + 1, limit)
        a = b - 1
    return a, b


def _frame_sentence(frame: str, frame_w: int, frame_h: int) -> str:
    if frame == "norm1000":
        return ("Coordinates are normalised: x and y both run from 0 (left/top edge) to 1000 "
                "(right/bottom edge) whatever the image's shape.")
    seen = "as you see it" if frame == "input" else "in its original resolution"
    return (f"Coordinates are pixels of the image {seen}: it is {frame_w} pixels wide and {frame_h} "
            f"pixels high, x grows to the right and y downwards from the top-left corner (0, 0).")


def brief_system_prompt(*, frame: str, frame_w: int, frame_h: int, allow_zoom: bool = False) -> str:
    """The two-sentence system message of ``PromptConfig.system == "brief"``: task, grammar and frame
    (and a third on the zoom tool when it is allowed)."""
    where = "0-1000 normalised" if frame == "norm1000" else f"pixels of the {frame_w}x{frame_h} image"
    text = (f"Find the animal hidden by camouflage. Reply <think>…</think><answer>JSON</answer> with boxes "
            f"[x1, y1, x2, y2] in {where}.")
    if allow_zoom:
        text += " Or reply <think>…</think><zoom>[x1, y1, x2, y2]</zoom> to see that region enlarged."
    return text


def system_prompt(*, frame: str, frame_w: int, frame_h: int, n_demos: int = 0, allow_zoom: bool = False) -> str:
    """The system message text: role, answer grammar, coordinate frame, tool, demonstrations."""
    parts = [
        "You find animals and objects that are hidden by camouflage. Look at the whole image first, "
        "then at suspicious regions, and check your guess before you answer.",
        "Reply in exactly this form: <think>your reasoning</think><answer>JSON</answer>. The JSON is "
        '{"present": true, "category": "<name>", "boxes": [[x1, y1, x2, y2], ...]} with one box per '
        'object (x1, y1 top-left, x2, y2 bottom-right corner), or {"present": false, "category": null, '
        '"boxes": []} if there is none.',
        _frame_sentence(frame, frame_w, frame_h),
        "While thinking you may mark a region you are inspecting as <focus>[x1, y1, x2, y2]</focus>.",
    ]
    if allow_zoom:
        parts.append("To see a region enlarged, end your turn right after </think> with "
                     "<zoom>[x1, y1, x2, y2]</zoom>; the enlarged region is then shown and you continue.")
    if n_demos:
        parts.append("Examples of the reasoning on other images of the same size:")
        demos = demo_texts(n=n_demos, frame_w=frame_w, frame_h=frame_h)
        parts += [f"Example {k + 1}: {text}" for k, text in enumerate(demos)]
    return "\n".join(parts)


def build_messages(*, question: str, task: str, width: int, height: int, config: PromptConfig,
                   input_size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Qwen2.5-VL chat messages for one row: a system message and a user turn (image, then text).

    ``width``/``height`` are the row's original size; ``input_size`` (w, h) the processor-resized
    size, required for frame "input". ``task`` is checked so an unknown task fails here, not later.
    """
    if task not in ("camo", "classify", "detect", "ground"):
        raise ValueError(f"task: unknown {task!r} (expected camo, classify, detect or ground)")
    frame_w, frame_h = frame_size(config.frame, width=width, height=height, input_size=input_size)
    if config.system == "omit":
        # Empty, not absent: without a system message the chat template would insert its default one.
        system = ""
    elif config.system == "brief":
        system = brief_system_prompt(frame=config.frame, frame_w=frame_w, frame_h=frame_h,
                                     allow_zoom=config.allow_zoom)
    else:
        system = system_prompt(frame=config.frame, frame_w=frame_w, frame_h=frame_h,
                               n_demos=config.n_demos, allow_zoom=config.allow_zoom)
    user: list[dict[str, Any]] = [{"type": "image"}]
    if config.question == "row":
        user.append({"type": "text", "text": question})
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def answer_json(*, present: bool, category: str | None, boxes: Sequence[Sequence[int]]) -> str:
    """The answer JSON exactly as completions carry it."""
    return json.dumps({"present": present, "category": category if present else None,
                       "boxes": [list(b) for b in boxes] if present else []})


def target_completion(row: dict[str, Any], *, frame: str, input_size: tuple[int, int] | None = None,
                      think: Literal["refocus", "brief"] = "refocus") -> str:
    """The ideal completion for a data set row: a think, then the exact answer.

    ``think`` "refocus": a short Visual-Refocus trace (overview, focus boxes, summary); "brief": the
    verdict and the category ("present moth", or "none"; see rewards.think), so a small model decides
    what it sees before it writes boxes, at a fraction of the tokens. Boxes are converted from original
    pixels into ``frame`` and rounded.
    """
    boxes = [box_to_frame(b, frame=frame, width=row["width"], height=row["height"], input_size=input_size)
             for b in row["boxes"]]
    if think == "brief":
        answer = answer_json(present=bool(row["present"]), category=row["category"], boxes=boxes)
        return f"<think>{brief_think(bool(row['present']), row['category'])}</think><answer>{answer}</answer>"
    if think != "refocus":
        raise ValueError(f"think: expected refocus or brief, got {think!r}")
    overview = "Overview: a textured scene; I look for an outline that breaks its pattern."
    name = row["category"] or "animal"
    if not row["present"]:
        think = f"{overview} Summary: nothing breaks the pattern, so no animal is hidden here."
    elif not boxes:  # a classify row may carry no box
        think = f"{overview} Summary: a {name} is hidden here."
    else:
        focus = " ".join(f"<focus>{json.dumps(b)}</focus>" for b in boxes)
        think = f"{overview} Focus: {focus} has the shape of a {name}. Summary: {len(boxes)} {name} hidden there."
    answer = answer_json(present=bool(row["present"]), category=row["category"], boxes=boxes)
    return f"<think>{think}</think><answer>{answer}</answer>"


@dataclass(frozen=True)
class _Demo:
    """A trajectory demonstration; boxes are fractions of the image so they fit any frame."""

    scene: str  # what the (not shown) demo image contains
    steps: str  # think text; {0}, {1}, ... are replaced by the focus boxes
    focus: tuple[UnitBox, ...]
    category: str | None
    boxes: tuple[UnitBox, ...]


DEMOS: tuple[_Demo, ...] = (
    _Demo(
        scene="grey-brown tree bark.",
        steps=("Overview: bark with vertical grain fills the image; nothing stands out at first glance. "
               "Focus: in the upper left the grain is interrupted <focus>{0}</focus>, a patch whose texture "
               "runs sideways. Rethink: a knot would be round, but this patch has two symmetric wings and a "
               "thin body down the middle, so it is a moth resting flat. Backtracing: checking its edge again "
               "<focus>{1}</focus>, the right wing reaches further than I first thought, so the box must be "
               "wider. Summary: one moth with spread wings in the upper left."),
        focus=((0.12, 0.10, 0.40, 0.38), (0.10, 0.08, 0.48, 0.40)),
        category="moth",
        boxes=((0.10, 0.08, 0.48, 0.40),),
    ),
    _Demo(
        scene="rippled sand.",
        steps=("Overview: sandy ground with regular ripples. Focus: a darker oval in the centre "
               "<focus>{0}</focus> could be a flatfish or a crab. Rethink: its edges follow the ripple "
               "direction and it has no eye, fin or leg, so it is the shadow of a ripple crest. Backtracing: "
               "scanning the corners again <focus>{1}</focus> shows the same ripples everywhere. Summary: "
               "no hidden animal."),
        focus=((0.38, 0.40, 0.62, 0.58), (0.0, 0.0, 1.0, 1.0)),
        category=None,
        boxes=(),
    ),
    _Demo(
        scene="green moss with small stones.",
        steps=("Overview: mottled green moss, lighter in the lower half. Focus: two small round bumps side "
               "by side <focus>{0}</focus> look like eyes. Rethink: if they are eyes, a body should follow "
               "behind them; below them there is a rounded outline with folded hind legs, a frog seen from "
               "above. Backtracing: the first box only held the head <focus>{1}</focus>; the legs extend "
               "further down and to both sides. Summary: one frog in the lower middle."),
        focus=((0.42, 0.45, 0.58, 0.55), (0.30, 0.44, 0.72, 0.92)),
        category="frog",
        boxes=((0.30, 0.44, 0.72, 0.92),),
    ),
    _Demo(
        scene="pebbles on a sea floor.",
        steps=("Overview: teal water over a sandy floor scattered with pebbles. Focus: an elongated pebble "
               "on the right <focus>{0}</focus> has a dark dot at one end. Rethink: pebbles have no eyes; "
               "a thin triangle behind it is a tail, so this is a fish lying on the floor. Backtracing: the "
               "tail end was outside my box <focus>{1}</focus>, so I widen it to the left. Summary: one fish "
               "on the right."),
        focus=((0.62, 0.30, 0.90, 0.52), (0.50, 0.28, 0.90, 0.54)),
        category="fish",
        boxes=((0.50, 0.28, 0.90, 0.54),),
    ),
)


def _unit_box(box: UnitBox, frame_w: int, frame_h: int) -> list[int]:
    return box_to_frame([box[0] * frame_w, box[1] * frame_h, box[2] * frame_w, box[3] * frame_h],
                        frame="original", width=frame_w, height=frame_h)


def demo_completions(*, n: int, frame_w: int, frame_h: int) -> list[str]:
    """The first ``n`` demonstrations as completions, with boxes in a frame of the given size."""
    if not 0 <= n <= len(DEMOS):
        raise ValueError(f"n_demos: expected 0..{len(DEMOS)}, got {n}")
    completions = []
    for demo in DEMOS[:n]:
        focus = [json.dumps(_unit_box(b, frame_w, frame_h)) for b in demo.focus]
        boxes = [_unit_box(b, frame_w, frame_h) for b in demo.boxes]
        answer = answer_json(present=demo.category is not None, category=demo.category, boxes=boxes)
        completions.append(f"<think>{demo.steps.format(*focus)}</think><answer>{answer}</answer>")
    return completions


def demo_texts(*, n: int, frame_w: int, frame_h: int) -> list[str]:
    """Demonstrations as prompt text: the scene they are about, then the completion."""
    return [f"an image of {demo.scene}\n{completion}" for demo, completion in
            zip(DEMOS, demo_completions(n=n, frame_w=frame_w, frame_h=frame_h))]
