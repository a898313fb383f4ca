"""The only data types that cross process boundaries.

Every object here is a plain dataclass of Python scalars, lists and bytes so that it pickles cheaply
through Ray and converts losslessly to an Arrow record batch (the buffer spills them to Parquet).
Each carries the ``policy_version`` of the weights that produced it: staleness is judged on it.

Token layout of one trajectory (one sample of a group)::

    prompt_ids                     completion_ids
    [system, user + <image pads>]  [model turn 1][env turn: user + zoom-crop pads][model turn 2] ...
                                   loss_mask:  1 ... 1 | 0 ............ 0         | 1 ... 1

``behaviour_logprobs`` has one value per completion token (0.0 where ``loss_mask`` is 0), taken from
the rollout engine that sampled the token. Environment-inserted tokens are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Target:
    """Ground truth of one prompt, in ORIGINAL image pixels (the data set's frame)."""

    present: bool
    category: str | None
    boxes: list[list[float]]  # [[x1, y1, x2, y2], ...]
    width: int
    height: int


@dataclass
class PromptGroup:
    """One prompt to be sampled ``n`` times: the unit that rollout workers pull from the sampler."""

    group_id: str  # unique per issue of a prompt, e.g. f"{prompt_id}#{issue_counter}"
    prompt_id: str  # the data set row id
    task: str  # camo / classify / detect / ground
    difficulty: str  # easy / hard
    question: str
    image: bytes  # encoded PNG/JPEG of the original image
    target: Target
    stage: int  # curriculum stage the prompt was issued under


@dataclass
class Trajectory:
    """One sampled (possibly multi-turn) completion of a prompt."""

    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # len == len(completion_ids)
    loss_mask: list[int]  # len == len(completion_ids); 0 for environment-inserted tokens
    completion_text: str  # decoded model text of every model turn, joined (for rewards and logs)
    zoom_images: list[bytes] = field(default_factory=list)  # encoded crops shown back, in order
    zoom_boxes: list[list[float]] = field(default_factory=list)  # each crop's box, original pixels
    finish_reason: str = "stop"  # stop / length / turns / bad_zoom (actors.rollout FINISH_*)
    rewards: dict[str, float] = field(default_factory=dict)  # per component, filled by reward workers
    reward: float = 0.0  # weighted total
    parse_failure: str | None = None


@dataclass
class TrajectoryGroup:
    """All ``n`` samples of one prompt. Buffers and learners only ever handle complete groups."""

    prompt: PromptGroup
    trajectories: list[Trajectory]
    policy_version: int  # weights version the rollout engine held when it sampled
    worker_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generate, reward, ...

    @property
    def group_id(self) -> str:
        return self.prompt.group_id

    @property
    def stage(self) -> int:
        return self.prompt.stage


# Token ids that stand for image/video content. The model must never SAMPLE them: a completion with
# an image pad would make the learner's forward look for an image that is not there. Rollout engines
# mask them out of sampling and the learner masks them out of its log-softmax, so behaviour and
# learner log-probs are over the same distribution.
PLACEHOLDER_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def placeholder_token_ids(hf_config) -> list[int]:
    """The ids of ``PLACEHOLDER_TOKEN_KEYS`` in a Qwen2.5-VL transformers config (those it defines)."""
    return sorted({int(getattr(hf_config, key)) for key in PLACEHOLDER_TOKEN_KEYS
                   if getattr(hf_config, key, None) is not None})
