"""Prompt builder: every task and frame renders; demonstrations and targets follow the grammar."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from data.prompts import (
    DEMOS,
    FRAMES,
    PromptConfig,
    box_to_frame,
    build_messages,
    demo_completions,
    question_for,
    target_completion,
)
from data.synth import CATEGORIES

# Our own grammar check (the rewards package's parser is written in parallel): one think block,
# then one answer block holding JSON with exactly present / category / boxes.
COMPLETION = re.compile(r"^<think>(?P<think>.*?)</think><answer>(?P<answer>.*?)</answer>$", re.DOTALL)
FOCUS = re.compile(r"<focus>(\[[^\]]*\])</focus>")
TASKS = ("camo", "classify", "detect", "ground")


def parse(completion: str, *, frame_w: int, frame_h: int) -> tuple[str, dict]:
    match = COMPLETION.match(completion)
    assert match, completion
    think, answer = match.group("think"), json.loads(match.group("answer"))
    assert set(answer) == {"present", "category", "boxes"}
    assert isinstance(answer["present"], bool)
    if not answer["present"]:
        assert answer["category"] is None and answer["boxes"] == []
    assert "<answer>" not in think and "<think>" not in think
    stray = FOCUS.sub("", think)
    assert "<focus>" not in stray and "</focus>" not in stray  # every focus tag is well formed
    for box in [json.loads(b) for b in FOCUS.findall(think)] + answer["boxes"]:
        assert len(box) == 4 and all(isinstance(v, int) for v in box)
        assert 0 <= box[0] < box[2] <= frame_w and 0 <= box[1] < box[3] <= frame_h, box
    return think, answer


def _row(**overrides):
    row = {"id": "r", "width": 112, "height": 112, "task": "camo", "category": "moth",
           "boxes": [[10.4, 20.5, 50.6, 60.49]], "present": True}
    row.update(overrides)
    return row


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_and_frame_renders(task, frame):
    question = question_for(task, category="frog", phrase="the frog on the left", categories=CATEGORIES)
    config = PromptConfig(frame=frame, n_demos=2)
    messages = build_messages(question=question, task=task, width=640, height=480, config=config,
                              input_size=(448, 336))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": question}]
    system = messages[0]["content"]
    expected_size = {"original": "640 pixels wide and 480 pixels high",
                     "input": "448 pixels wide and 336 pixels high",
                     "norm1000": "from 0 (left/top edge) to 1000"}[frame]
    assert expected_size in system and "<think>" in system and '"present": false' in system
    assert system.count("Example ") == 2 and "<zoom>" not in system


def test_zoom_tool_is_described_only_when_allowed():
    config = PromptConfig(frame="original", allow_zoom=True)
    system = build_messages(question="q", task="camo", width=100, height=80, config=config)[0]["content"]
    assert "<zoom>[x1, y1, x2, y2]</zoom>" in system


def test_brief_prompt_without_the_question_is_the_image_alone():
    config = PromptConfig(frame="original", system="brief", question="omit")
    system, user = build_messages(question="Where is it?", task="camo", width=100, height=80, config=config)
    assert user["content"] == [{"type": "image"}]
    assert system["content"].startswith("Find the animal") and "pixels of the 100x80 image" in system["content"]
    assert "<zoom>" not in system["content"]


def test_brief_prompt_names_the_zoom_tool_when_allowed_and_carries_no_demos():
    config = PromptConfig(frame="original", system="brief", question="omit", allow_zoom=True)
    system = build_messages(question="q", task="camo", width=100, height=80, config=config)[0]["content"]
    assert system.endswith("<think>…</think><zoom>[x1, y1, x2, y2]</zoom> to see that region enlarged.")
    with pytest.raises(ValidationError, match="brief carries no demonstrations"):
        PromptConfig(system="brief", n_demos=1)


def test_omitted_system_prompt_is_an_empty_message_not_the_templates_default():
    from models.tokenizer import train_tokenizer

    config = PromptConfig(frame="input", system="omit", question="omit")
    messages = build_messages(question="q", task="camo", width=112, height=112, config=config, input_size=(112, 112))
    assert messages[0] == {"role": "system", "content": ""}
    # Without any system message Qwen's chat template would insert "You are a helpful assistant."
    text = train_tokenizer(vocab_size=2048).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert "helpful" not in text
    with pytest.raises(ValidationError, match="omit carries no demonstrations"):
        PromptConfig(system="omit", n_demos=1)


def test_input_frame_needs_the_input_size_and_tasks_are_checked():
    with pytest.raises(ValueError, match="input_size"):
        build_messages(question="q", task="camo", width=100, height=80, config=PromptConfig(frame="input"))
    with pytest.raises(ValueError, match="task: unknown"):
        build_messages(question="q", task="segment", width=100, height=80, config=PromptConfig(frame="original"))
    with pytest.raises(ValidationError, match="n_demos"):
        PromptConfig(n_demos=5)
    with pytest.raises(ValidationError, match="frame"):
        PromptConfig(frame="pixels")


def test_questions_per_task():
    assert "Possible animals: moth, fish" in question_for("camo", categories=CATEGORIES)
    assert question_for("detect", category="crab") == "Find every crab in this image and give one box for each."
    assert "the moth left of the stone" in question_for("ground", phrase="the moth left of the stone")
    with pytest.raises(ValueError, match="category"):
        question_for("detect")
    with pytest.raises(ValueError, match="phrase"):
        question_for("ground")
    with pytest.raises(ValueError, match="task"):
        question_for("segment")


@pytest.mark.parametrize("frame_w, frame_h", [(112, 112), (1000, 1000), (640, 480), (28, 28)])
def test_every_demo_is_valid_and_follows_the_refocus_stages(frame_w, frame_h):
    completions = demo_completions(n=len(DEMOS), frame_w=frame_w, frame_h=frame_h)
    assert len(completions) == len(DEMOS) == 4
    for completion in completions:
        think, answer = parse(completion, frame_w=frame_w, frame_h=frame_h)
        stages = [think.index(s) for s in ("Overview:", "Focus:", "Rethink:", "Backtracing:", "Summary:")]
        assert stages == sorted(stages)
        assert len(FOCUS.findall(think)) == 2
        assert answer["category"] is None or answer["category"] in CATEGORIES


def test_target_completion_boxes_are_rounded_in_the_requested_frame():
    row = _row()
    # 10.4 → 10, 20.5 → 21 (half up), 50.6 → 51, 60.49 → 60
    _, answer = parse(target_completion(row, frame="original"), frame_w=112, frame_h=112)
    assert answer == {"present": True, "category": "moth", "boxes": [[10, 21, 51, 60]]}
    # × 1000 / 112: 92.86 → 93, 183.04 → 183, 451.79 → 452, 540.09 → 540
    _, answer = parse(target_completion(row, frame="norm1000"), frame_w=1000, frame_h=1000)
    assert answer["boxes"] == [[93, 183, 452, 540]]
    # × 2: 20.8 → 21, 41.0 → 41, 101.2 → 101, 120.98 → 121
    think, answer = parse(target_completion(row, frame="input", input_size=(224, 224)), frame_w=224, frame_h=224)
    assert answer["boxes"] == [[21, 41, 101, 121]] and "<focus>[21, 41, 101, 121]</focus>" in think


def test_target_completion_for_absent_multi_and_boxless_rows():
    absent = target_completion(_row(category=None, boxes=[], present=False), frame="original")
    assert absent.endswith('<answer>{"present": false, "category": null, "boxes": []}</answer>')
    parse(absent, frame_w=112, frame_h=112)
    two = _row(boxes=[[0, 0, 10, 10], [50, 50, 112, 112]])
    think, answer = parse(target_completion(two, frame="original"), frame_w=112, frame_h=112)
    assert answer["boxes"] == [[0, 0, 10, 10], [50, 50, 112, 112]] and len(FOCUS.findall(think)) == 2
    boxless = target_completion(_row(task="classify", boxes=[]), frame="original")
    _, answer = parse(boxless, frame_w=112, frame_h=112)
    assert answer == {"present": True, "category": "moth", "boxes": []}


def test_tiny_boxes_never_collapse_when_the_frame_is_coarser():
    assert box_to_frame([100.2, 5.0, 100.4, 6.0], frame="norm1000", width=5000, height=5000) == [20, 1, 21, 2]
    corner = box_to_frame([4990, 4990, 5000, 5000], frame="norm1000", width=5000, height=5000)
    assert corner == [998, 998, 1000, 1000]
    assert box_to_frame([4999.5, 0, 5000, 1], frame="norm1000", width=5000, height=5000) == [999, 0, 1000, 1]
