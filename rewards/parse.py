"""Completion text → typed parse result. Never raises on any input.

Grammar of a completion (see the common brief), with the multi-turn zoom extension::

    completion := ws (turn ws)* final ws
    turn       := <think> TEXT </think> ws <zoom> BOX </zoom>      (a zoom request ends a turn)
    final      := <think> TEXT </think> ws <answer> JSON </answer>

TEXT may hold ``<focus>BOX</focus>`` refocus boxes. This is Visual-RFT's
``<think>.*?</think>\\s*<answer>.*?</answer>`` full match, extended to zoom turns, and tolerant of
surrounding whitespace (decoded text often ends with a newline).

Two questions are answered separately:
- does the tag structure follow the grammar exactly? (``strict_violation`` is None when it does);
- can an answer be extracted? In lenient mode a grammar violation does not prevent extraction: text
  outside the tags is ignored, the LAST closed ``<answer>`` block is used, and an unclosed final
  ``<answer>`` (a completion cut by the length limit) is read to the end of the text, less a closing tag
  the cut left half-written. In strict mode
  any grammar violation is the failure. Without any ``<answer>`` tag the reason is always
  NO_ANSWER_TAG, whatever else is wrong.

The answer JSON is read with ``json.loads`` first (the fast path). Only if that fails, repairs for
what models really emit are tried: code fences, single quotes, Python literals (True/None), trailing
commas, and a truncated document (cut back to the latest complete value that gives an answer, keeping
complete boxes, then closed). A repaired answer is usable but never "strict". Boxes may be given nested
(``[[x1,y1,x2,y2], ...]``), as a single flat box, or as Qwen-style objects (``{"bbox_2d": [...]}``).

Cost is bounded: texts over ``max_chars`` fail as TOO_LONG before any scanning, answers with more than
``max_boxes`` boxes fail as TOO_MANY_BOXES, and the truncation repair refuses nesting deeper than
``_MAX_REPAIR_DEPTH``. Every scan is linear in the text length.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from rewards.category import names_a_category
from rewards.types import Box

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 32_768
DEFAULT_MAX_BOXES = 100


class ParseFailure(str, Enum):
    """Why no answer was extracted (or, as ``strict_violation``, why the grammar did not match)."""

    EMPTY = "empty"  # empty or whitespace-only text (or not a str at all)
    TOO_LONG = "too_long"  # more than max_chars characters
    NO_ANSWER_TAG = "no_answer_tag"  # no <answer> tag at all (e.g. cut after a zoom turn)
    NO_THINK_TAG = "no_think_tag"  # strict: <answer>/<zoom> without a preceding <think> block
    UNCLOSED_TAG = "unclosed_tag"  # strict: a tag opened and never closed
    BAD_STRUCTURE = "bad_structure"  # strict: tags out of order, nested or repeated
    TEXT_OUTSIDE_TAGS = "text_outside_tags"  # strict: non-whitespace text between turns
    BAD_JSON = "bad_json"  # answer is not a JSON object, even after repairs
    BAD_BOX = "bad_box"  # a box is not 4 finite numbers (strict: also focus/zoom boxes)
    TOO_MANY_BOXES = "too_many_boxes"  # more than max_boxes boxes in the answer
    # strict: '"present": false' with boxes listed. The boxes never count (``Answer.detections``); RL
    # learnt to add them to "none" answers, a free second guess while IoU was scored on them.
    ABSENT_WITH_BOXES = "absent_with_boxes"
    # strict: '"present": false' naming a category. The category never counts (``Answer.stated_category``):
    # scored, "none, but if anything a moth" earned the category reward on images with a moth.
    ABSENT_WITH_CATEGORY = "absent_with_category"
    INTERNAL_ERROR = "internal_error"  # a bug in this parser (logged); the completion scores 0
    # Not the parser's: set by rewards.think when RewardConfig.think_rule says the think must agree.
    THINK_CONTRADICTS_ANSWER = "think_contradicts_answer"


@dataclass(frozen=True, slots=True)
class Answer:
    """The final answer. Boxes are in the completion's coordinate frame (see rewards.frames)."""

    present: bool | None  # None when neither "present" nor any boxes field was given
    category: str | None  # stripped; None when missing or not a string
    boxes: list[Box]
    confidences: list[float] | None  # parallel to boxes, each in [0, 1]; None when absent/invalid

    @property
    def detections(self) -> list[Box]:
        """The boxes the answer stands by: none when it says that no object is present, whatever it lists
        (what the IoU reward and the evaluation score)."""
        return [] if self.present is False else self.boxes

    @property
    def stated_category(self) -> str | None:
        """The category the answer stands by: none when it says that no object is present, whatever it
        names (what the category reward and the evaluation score)."""
        return None if self.present is False else self.category


@dataclass(frozen=True, slots=True)
class ParsedCompletion:
    """Result of ``parse_completion``: an answer, or the reason there is none."""

    answer: Answer | None
    failure: ParseFailure | None  # set exactly when answer is None
    strict_violation: ParseFailure | None  # None when the tags follow the grammar exactly
    json_repaired: bool = False  # the answer JSON needed a repair to parse
    think: str = ""  # all think blocks' text, joined by newlines
    focus_boxes: list[Box] = field(default_factory=list)  # <focus> boxes, completion frame
    zoom_boxes: list[Box] = field(default_factory=list)  # <zoom> requests, completion frame
    final_think: str = ""  # the think the answer follows: the last closed before it (no answer: the last)

    @property
    def strict(self) -> bool:
        """Full grammar match AND answer JSON valid without any repair (Visual-RFT's format check)."""
        return self.answer is not None and self.strict_violation is None and not self.json_repaired


def parse_completion(
    text: str,
    *,
    lenient: bool = True,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_boxes: int = DEFAULT_MAX_BOXES,
) -> ParsedCompletion:
    """Parse one completion. Never raises; see the module docstring for the grammar and repairs."""
    try:
        return _parse(text, lenient=lenient, max_chars=max_chars, max_boxes=max_boxes)
    except Exception:  # noqa: BLE001 - last line of defence: a reward must never crash the run
        size = len(text) if isinstance(text, str) else -1
        logger.warning("parser bug on a completion of %d chars", size, exc_info=True)
        return _failed(ParseFailure.INTERNAL_ERROR, ParseFailure.INTERNAL_ERROR)


# ---------------------------------------------------------------------------------------------
# Tag structure

# Splitting on the tags gives [text, tag, text, tag, ..., text]: odd items are tags, and the text
# right after a tag is its content (or the gap before the next tag).
_SPLIT_RE = re.compile(r"(</?(?:think|answer|zoom|focus)>)")

# Strict grammar as a state machine over tags: (state, tag) -> next state.
_OUT, _THINK, _FOCUS, _AFTER_THINK, _ZOOM, _ANSWER, _DONE = range(7)
_STRICT_NEXT = {
    (_OUT, "<think>"): _THINK,
    (_THINK, "<focus>"): _FOCUS,
    (_FOCUS, "</focus>"): _THINK,
    (_THINK, "</think>"): _AFTER_THINK,
    (_AFTER_THINK, "<zoom>"): _ZOOM,
    (_ZOOM, "</zoom>"): _OUT,
    (_AFTER_THINK, "<answer>"): _ANSWER,
    (_ANSWER, "</answer>"): _DONE,
}
_BLANK_STATES = frozenset({_OUT, _AFTER_THINK, _DONE})  # only whitespace may follow entering these
_OPEN_STATES = frozenset({_THINK, _FOCUS, _ZOOM, _ANSWER})


@dataclass(slots=True)
class _Pieces:
    """Tag contents found in a completion."""

    think: list[str] = field(default_factory=list)
    focus: list[str] = field(default_factory=list)
    zoom: list[str] = field(default_factory=list)
    answer: str | None = None
    final_think: str = ""  # the last think closed before the answer opened (without an answer: the last one)


def _strict_pieces(parts: list[str]) -> tuple[ParseFailure | None, _Pieces]:
    """Walk the tags through the strict grammar; returns the first violation and the contents seen."""
    pieces = _Pieces()
    if parts[0] and not parts[0].isspace():
        return ParseFailure.TEXT_OUTSIDE_TAGS, pieces
    state, think_at = _OUT, 0
    for k in range(1, len(parts), 2):
        tag = parts[k]
        nxt = _STRICT_NEXT.get((state, tag))
        if nxt is None:
            if state == _OUT and (tag == "<answer>" or tag == "<zoom>"):
                return ParseFailure.NO_THINK_TAG, pieces
            return ParseFailure.BAD_STRUCTURE, pieces
        after = parts[k + 1]
        if nxt in _BLANK_STATES and after and not after.isspace():
            return ParseFailure.TEXT_OUTSIDE_TAGS, pieces
        if tag == "<think>":
            think_at = k
        elif tag == "</think>":
            pieces.think.append(parts[think_at + 1] if k == think_at + 2 else "".join(parts[think_at + 1 : k]))
        elif tag == "<focus>":
            pieces.focus.append(after)
        elif tag == "<zoom>":
            pieces.zoom.append(after)
        elif tag == "<answer>":
            pieces.answer = after
            pieces.final_think = pieces.think[-1]
        state = nxt
    if state == _DONE:
        return None, pieces
    if state in _OPEN_STATES:
        return ParseFailure.UNCLOSED_TAG, pieces
    return ParseFailure.NO_ANSWER_TAG, pieces


def _lenient_pieces(parts: list[str]) -> _Pieces:
    """Pair each closing tag with the latest opening tag of its name; ignore everything else.

    The answer is the LAST closed <answer> block; failing that, an unclosed <answer> read to the end
    of the text (the completion was cut while answering), less a closing tag the cut left half-written
    (``</ans``). The final think is the last one closed before that answer opened: a think written after
    the answer does not speak for it.
    """
    pieces = _Pieces()
    open_at: dict[str, int] = {}
    thinks_closed_at: list[int] = []  # index in parts of each think's closing tag, parallel to pieces.think
    answer_at = None  # index in parts of the answer's opening tag
    for k in range(1, len(parts), 2):
        tag = parts[k]
        if tag[1] != "/":
            open_at[tag[1:-1]] = k
            continue
        name = tag[2:-1]
        opened = open_at.pop(name, None)
        if opened is None:
            continue
        content = "".join(parts[opened + 1 : k])
        if name == "answer":
            pieces.answer, answer_at = content, opened
        else:
            getattr(pieces, name).append(content)
            if name == "think":
                thinks_closed_at.append(k)
    if pieces.answer is None and "answer" in open_at:
        answer_at = open_at["answer"]
        pieces.answer = _without_cut_closing_tag("".join(parts[answer_at + 1 :]))
    before = [t for t, k in zip(pieces.think, thinks_closed_at) if answer_at is None or k < answer_at]
    pieces.final_think = before[-1] if before else ""
    return pieces


_ANSWER_CLOSE = "</answer>"


def _without_cut_closing_tag(text: str) -> str:
    """``text`` less a trailing ``<``, ``</``, ... ``</answer`` (a closing tag cut by the length limit)."""
    for n in range(len(_ANSWER_CLOSE) - 1, 0, -1):
        if text.endswith(_ANSWER_CLOSE[:n]):
            return text[:-n]
    return text


def _parse(text: object, *, lenient: bool, max_chars: int, max_boxes: int) -> ParsedCompletion:
    if not isinstance(text, str) or not text or text.isspace():
        return _failed(ParseFailure.EMPTY, ParseFailure.EMPTY)
    if len(text) > max_chars:
        return _failed(ParseFailure.TOO_LONG, ParseFailure.TOO_LONG)
    parts = _SPLIT_RE.split(text)
    violation, pieces = _strict_pieces(parts)
    if violation is not None and "<answer>" not in parts:
        violation = ParseFailure.NO_ANSWER_TAG  # the most telling reason, whatever else is wrong
    if violation is not None:
        if not lenient:
            return _failed(violation, violation)
        pieces = _lenient_pieces(parts)
    think = pieces.think[0] if len(pieces.think) == 1 else "\n".join(pieces.think)
    final_think = pieces.final_think
    focus, focus_ok = _side_boxes(pieces.focus, max_boxes)
    zoom, zoom_ok = _side_boxes(pieces.zoom, max_boxes)
    if violation is None and not (focus_ok and zoom_ok):
        violation = ParseFailure.BAD_BOX
        if not lenient:
            return _failed(violation, violation)
    if pieces.answer is None:
        return ParsedCompletion(None, ParseFailure.NO_ANSWER_TAG, violation, False, think, focus, zoom, final_think)
    answer, repaired = _decode_answer(pieces.answer, max_boxes)
    if isinstance(answer, ParseFailure):
        return ParsedCompletion(None, answer, violation, repaired, think, focus, zoom, final_think)
    if violation is None and answer.present is False and (answer.boxes or names_a_category(answer.category)):
        violation = ParseFailure.ABSENT_WITH_BOXES if answer.boxes else ParseFailure.ABSENT_WITH_CATEGORY
        if not lenient:
            return _failed(violation, violation)
    return ParsedCompletion(answer, None, violation, repaired, think, focus, zoom, final_think)


def _failed(failure: ParseFailure, violation: ParseFailure | None) -> ParsedCompletion:
    return ParsedCompletion(answer=None, failure=failure, strict_violation=violation)


def _side_boxes(raw_boxes: list[str], max_boxes: int) -> tuple[list[Box], bool]:
    """Boxes of <focus>/<zoom> tags (at most max_boxes kept); ok is False if any was malformed."""
    if not raw_boxes:
        return [], True
    boxes: list[Box] = []
    ok = len(raw_boxes) <= max_boxes
    for raw in raw_boxes[:max_boxes]:
        box = box_from_text(raw)
        if box is None:
            ok = False
        else:
            boxes.append(box)
    return boxes, ok


def box_from_text(raw: str) -> Box | None:
    """The box of a <focus>/<zoom> tag's text (JSON ``[x1, y1, x2, y2]`` or ``[[x1, y1, x2, y2]]``), or None.
    The zoom environment reads a request through this too, so what it serves is what the rewards accept."""
    try:
        value = json.loads(raw)
    except Exception:  # noqa: BLE001 - malformed box text is an expected model output
        return None
    if type(value) is list and len(value) == 1 and type(value[0]) is list:
        value = value[0]  # [[x1,y1,x2,y2]] for a single box
    return _box_from(value)


# ---------------------------------------------------------------------------------------------
# Answer JSON

_FENCE_RE = re.compile(r"```(?:json)?")
_PY_LITERAL_RE = re.compile(r"\b(?:True|False|None)\b")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_TRAILING_COMMA_RE = re.compile(r",\s*([\]}])")
_MAX_REPAIR_DEPTH = 32  # no real answer nests deeper; bounds the truncation repair's work
_TRUNCATION_CANDIDATES = 3  # cut points tried, latest first


def _decode_answer(raw: str, max_boxes: int) -> tuple[Answer | ParseFailure, bool]:
    """(answer, repaired), or (why not, repaired). Of a truncated document's cut points the latest that
    gives an answer wins: closing it where it stopped can leave a half-written box item (``{"bbox_2d":
    [1, 2, 3, 4]}, {``), which an earlier cut drops while keeping the complete boxes."""
    first: tuple[ParseFailure, bool] | None = None  # the failure of the latest reading
    for value, repaired in _json_values(raw):
        answer = _to_answer(value, max_boxes)
        if not isinstance(answer, ParseFailure):
            return answer, repaired
        first = first or (answer, repaired)
        if answer is not ParseFailure.BAD_BOX:
            break
    return first or (ParseFailure.BAD_JSON, False)


def _json_values(raw: str):
    """The JSON values ``raw`` may be read as, each with whether it needed a repair: the text as it is, else
    after the textual repairs, else each cut point of a truncated document that parses (latest first)."""
    try:
        yield json.loads(raw), False
        return
    except Exception:  # noqa: BLE001 - JSONDecodeError, RecursionError on deep nesting, ...
        pass
    fixed = _repair_text(raw.strip())
    try:
        yield json.loads(fixed), True
        return
    except Exception:  # noqa: BLE001
        pass
    for candidate in _truncation_candidates(fixed):
        try:
            value = json.loads(candidate)
        except Exception:  # noqa: BLE001
            continue
        yield value, True


def _double_quoted(s: str) -> str:
    """Single-quoted strings (Python's repr) in double quotes, leaving double-quoted ones whole: Python writes
    ``{'category': "it's"}``, whose apostrophe must not open a string. One pass, linear in ``len(s)``."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch not in "'\"":
            j = i + 1
            while j < n and s[j] not in "'\"":
                j += 1
            out.append(s[i:j])
            i = j
            continue
        j = i + 1
        if ch == '"':  # copied as it is, escapes included
            while j < n and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            out.append(s[i:j + 1])
            i = j + 1
            continue
        inner: list[str] = []
        while j < n and s[j] not in "'\n":
            if s[j] == "\\" and j + 1 < n:
                inner.append("'" if s[j + 1] == "'" else s[j:j + 2])
                j += 2
            else:
                inner.append('\\"' if s[j] == '"' else s[j])
                j += 1
        if j < n and s[j] == "'":
            out.append('"' + "".join(inner) + '"')
            i = j + 1
        else:  # no closing quote on this line: a stray apostrophe, and no quote follows it before j
            out.append(s[i:j])
            i = j
    return "".join(out)


def _repair_text(s: str) -> str:
    """Textual repairs; only called once json.loads has failed."""
    s = _FENCE_RE.sub("", s)
    if "'" in s:
        s = _double_quoted(s)
    s = _PY_LITERAL_RE.sub(lambda m: _PY_LITERALS[m.group()], s)
    return _TRAILING_COMMA_RE.sub(r"\1", s).strip()


_CLOSER = {"[": "]", "{": "}"}


def _truncation_candidates(s: str) -> list[str]:
    """Close a document that was cut off, at its last few complete-value boundaries.

    Cut points are: the end of the text when it stops inside an object (not inside a string), right
    after a closing bracket, or just before a comma that separates object members. Commas inside
    arrays are NOT cut points, so a half-written box ``[5, 6,`` is dropped whole while the complete
    boxes before it are kept.
    """
    stack: list[str] = []
    cuts: deque[tuple[int, str]] = deque(maxlen=_TRUNCATION_CANDIDATES)
    in_string = escaped = False
    for i, ch in enumerate(s):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "[" or ch == "{":
            stack.append(ch)
            if len(stack) > _MAX_REPAIR_DEPTH:
                return []
        elif ch == "]" or ch == "}":
            if not stack or _CLOSER[stack.pop()] != ch:
                return []  # unbalanced: not a truncation, a different error
            cuts.append((i + 1, "".join(_CLOSER[c] for c in reversed(stack))))
        elif ch == "," and stack and stack[-1] == "{":
            cuts.append((i, "".join(_CLOSER[c] for c in reversed(stack))))
    if not stack:
        return []  # nothing was left open, so truncation is not the problem
    candidates = [s[:pos] + closers for pos, closers in reversed(cuts)]
    if not in_string and stack[-1] == "{":
        # Cut right after an object member's value (`{"present": true`): closing it is enough.
        candidates.insert(0, s.rstrip().rstrip(",") + "".join(_CLOSER[c] for c in reversed(stack)))
    return candidates


_BOX_KEYS = ("boxes", "box", "bbox", "bbox_2d")
_ITEM_BOX_KEYS = ("bbox_2d", "bbox", "box")
_ITEM_CONFIDENCE_KEYS = ("confidence", "score")
_TRUE_WORDS = frozenset({"true", "yes"})
_FALSE_WORDS = frozenset({"false", "no"})


def _number(x: object) -> float | None:
    kind = type(x)
    if kind is float:
        return x if math.isfinite(x) else None
    if kind is int:
        try:
            return float(x)
        except OverflowError:
            return None
    return None


_NUMBER_TYPES = (int, float)


def _box_from(value: object) -> Box | None:
    """[x1, y1, x2, y2] of finite numbers (bools and strings are not numbers here)."""
    if type(value) is not list or len(value) != 4:
        return None
    a, b, c, d = value
    if type(a) in _NUMBER_TYPES and type(b) in _NUMBER_TYPES and type(c) in _NUMBER_TYPES and type(d) in _NUMBER_TYPES:
        try:
            box = [float(a), float(b), float(c), float(d)]
        except OverflowError:  # an integer literal beyond float range
            return None
        isfinite = math.isfinite
        ok = isfinite(box[0]) and isfinite(box[1]) and isfinite(box[2]) and isfinite(box[3])
        return box if ok else None
    return None


def _to_bool(value: object) -> bool | None:
    if type(value) is bool:
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _to_answer(obj: object, max_boxes: int) -> Answer | ParseFailure:
    if type(obj) is not dict:
        return ParseFailure.BAD_JSON
    raw_boxes = None
    has_boxes_field = False
    for key in _BOX_KEYS:  # the first box field that is not null ({"boxes": null, "bbox_2d": [...]} has a box)
        if key in obj:
            has_boxes_field = True
            if obj[key] is not None:
                raw_boxes = obj[key]
                break
    boxes: list[Box] = []
    item_confidences: list[float | None] = []
    if raw_boxes is not None:
        if type(raw_boxes) is not list:
            return ParseFailure.BAD_BOX
        flat = _box_from(raw_boxes)
        if flat is not None:
            boxes = [flat]
        else:
            if len(raw_boxes) > max_boxes:
                return ParseFailure.TOO_MANY_BOXES
            for item in raw_boxes:
                confidence = None
                if type(item) is dict:
                    confidence = next(
                        (_number(item[k]) for k in _ITEM_CONFIDENCE_KEYS if k in item), None
                    )
                    item = next((item[k] for k in _ITEM_BOX_KEYS if k in item), None)
                box = _box_from(item)
                if box is None:
                    return ParseFailure.BAD_BOX
                boxes.append(box)
                item_confidences.append(confidence)
    present = _to_bool(obj.get("present"))
    if present is None and has_boxes_field:
        present = len(boxes) > 0
    category = obj.get("category")
    category = category.strip() if isinstance(category, str) else None
    confidences = _confidences(obj.get("confidences"), item_confidences, len(boxes))
    return Answer(present=present, category=category, boxes=boxes, confidences=confidences)


def _confidences(raw: object, from_items: list[float | None], n: int) -> list[float] | None:
    """Top-level "confidences" list, else per-item confidences; None unless all n are in [0, 1]."""
    if type(raw) is list:
        values = [_number(c) for c in raw]
    elif from_items and None not in from_items:
        values = list(from_items)
    else:
        return None
    if len(values) != n or any(v is None or not 0.0 <= v <= 1.0 for v in values):
        return None
    return values  # type: ignore[return-value]
