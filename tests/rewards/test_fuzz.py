"""Property-based fuzzing: >= 10,000 random and adversarial completions per run never break a reward.

Completions are built from grammar fragments (tags, JSON punctuation, keywords, odd numbers, random
unicode) and from valid answers that are then truncated or corrupted at a random point. Every
completion is scored under a randomly chosen config; every component must be finite and inside the
range rewards.components.RANGES documents, and the total must be the weighted sum.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.components import IOU, RANGES
from rewards.compose import score_batch
from rewards.config import RewardConfig
from rewards.parse import ParseFailure
from rewards.types import Target

BATCH = 50
EXAMPLES = 210  # 210 x 50 = 10,500 completions per run

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<zoom>", "</zoom>", "<focus>", "</focus>",
    "{", "}", "[", "]", ",", ":", '"', "'", "\\", "```json", "```", "\n", " ", "\t",
    '"present"', '"category"', '"boxes"', '"confidences"', '"bbox_2d"', "true", "false", "null",
    "True", "None", "NaN", "Infinity", "-Infinity", "1e999", "-1e308", "0", "-3", "2.5", "1" * 30,
    "moth", "<thinking>", "</answer", "<", ">", "\u0000", "\u00e9", "\U0001f98b",
]
fragment = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(max_size=6),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
)
soup = st.lists(fragment, max_size=25).map("".join)

coordinate = st.one_of(st.floats(min_value=-3000, max_value=3000), st.integers(-10, 2000))
box = st.lists(coordinate, min_size=4, max_size=4)
bad_box = st.lists(st.one_of(coordinate, st.text(max_size=2), st.booleans(), st.none()), max_size=5)
answer_json = st.fixed_dictionaries(
    {
        "present": st.one_of(st.booleans(), st.none(), st.sampled_from(["yes", "no", 1])),
        "category": st.one_of(st.none(), st.sampled_from(["moth", "Moths", "", "crab", "sea horse"]), st.text(max_size=5)),
        "boxes": st.one_of(st.lists(box, max_size=5), box, st.none(), st.lists(bad_box, max_size=3)),
    },
    optional={"confidences": st.lists(st.floats(min_value=-0.5, max_value=1.5), max_size=5)},
).map(json.dumps)


@st.composite
def damaged(draw) -> str:
    """A well-formed completion, then truncated, corrupted or wrapped in stray text."""
    zoom = draw(st.sampled_from(["", "<think>look</think><zoom>[1, 2, 30, 40]</zoom>"]))
    text = f"{zoom}<think>{draw(st.text(max_size=20))}</think><answer>{draw(answer_json)}</answer>"
    how = draw(st.sampled_from(["keep", "truncate", "insert", "wrap", "quotes"]))
    at = draw(st.integers(min_value=0, max_value=len(text)))
    if how == "truncate":
        return text[:at]
    if how == "insert":
        return text[:at] + draw(fragment) + text[at:]
    if how == "wrap":
        return draw(soup) + text + draw(soup)
    if how == "quotes":
        return text.replace('"', "'")
    return text


completion = st.one_of(soup, damaged(), st.text(max_size=60))
target = st.builds(
    Target,
    present=st.booleans(),
    category=st.one_of(st.none(), st.sampled_from(["moth", "crab", "sea horse", ""])),
    boxes=st.lists(box, max_size=4),
    # 16..2000 keeps the aspect ratio <= 125: Qwen's processor refuses images beyond 200.
    width=st.integers(min_value=16, max_value=2000),
    height=st.integers(min_value=16, max_value=2000),
)
config = st.builds(
    RewardConfig,
    frame=st.sampled_from([{"kind": "original"}, {"kind": "norm1000"}, {"kind": "input", "min_pixels": 56 * 56}]),
    iou=st.fixed_dictionaries({"mode": st.sampled_from(["optimal", "greedy"]), "giou": st.booleans()}),
    format_mode=st.sampled_from(["strict", "lenient"]),
    parse_mode=st.sampled_from(["strict", "lenient"]),
    think_rule=st.sampled_from(["free", "brief"]),
    no_object_credit=st.sampled_from(["all", "presence"]),
    max_boxes=st.sampled_from([3, 100]),
    overlong=st.just({"l_max": 100, "l_cache": 30}),
    default_weights=st.just({"format": 1.0, "presence": 0.5, "category": 2.0, "iou": 3.0, "confidence": 1.0, "overlong": 1.0}),
)
FAILURES = {f.value for f in ParseFailure}


def test_fuzzed_completions_get_finite_in_range_rewards():
    scored: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        completions=st.lists(completion, min_size=BATCH, max_size=BATCH),
        few_targets=st.lists(target, min_size=1, max_size=8),
        token_step=st.integers(min_value=1, max_value=9),
        cfg=config,
    )
    def check(completions, few_targets, token_step, cfg):
        # Targets and lengths are cycled over the batch: generating them costs more than scoring.
        targets = [few_targets[i % len(few_targets)] for i in range(BATCH)]
        tokens = [(i * token_step) % 201 for i in range(BATCH)]
        results = score_batch(completions, targets, config=cfg, weights=cfg.default_weights, num_tokens=tokens)
        for r in results:
            for name, value in r.components.items():
                low, high = RANGES[name]
                if name == IOU and not cfg.iou.giou:
                    low = 0.0
                assert math.isfinite(value) and low <= value <= high + 1e-12, (name, value)
            expected = sum(w * r.components[k] for k, w in cfg.default_weights.items())
            assert math.isfinite(r.total) and abs(r.total - expected) < 1e-9
            assert r.failure is None or r.failure in FAILURES
            assert r.strict_violation is None or r.strict_violation in FAILURES
        scored.append(len(results))

    check()
    assert sum(scored) >= 10_000
