"""Draws prompt ids for the current curriculum stage, optionally passing over prompts with no signal.

How a prompt is drawn in stage s:
1. Pick a difficulty with the stage's difficulty_weights (one uniform draw from the sampler's RNG).
2. Take the next prompt of the pool (stage's tasks, that difficulty). Each pool is walked in epochs:
   a permutation derived from (seed, pool, epoch number), so every prompt of a pool comes up once per
   epoch and tasks appear in proportion to their counts in the data. Stages with the same tasks share
   a pool and its position, so a new stage continues the epoch instead of replaying its start.

The data position is the RNG state plus (epoch, cursor) per pool; state_dict() records it, so a
resumed run draws the same next prompts as an uninterrupted one.

Filtering (config.filter_solved): GRPO learns nothing from a group whose samples all earn the same reward
(all solved, or all failed: every advantage is 0). record_outcome() keeps the reward spread (max - min) of
each prompt's last `history` groups; a prompt whose kept groups ALL had none is passed over when its turn
comes. That is the test dynamic sampling makes (``learner.advantages.signal_mask``), whatever the stage's
reward scale: a group rewarded [1, 2, 1, 2] carries a signal even if every sample got the format right. So
that nothing starves (the policy changes, and a hard prompt may become learnable), a prompt is passed over
at most `max_skips` times in a row; then it is issued again with its history cleared. Spreads depend on the
stage's reward, so the histories are cleared whenever the stage changes, and outcomes reported for another
stage are ignored (counted).

The sampler sees only small metadata records (id, task, difficulty); the caller maps ids to rows.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curriculum.config import DIFFICULTIES, TASKS, SamplerConfig, StageConfig

logger = logging.getLogger(__name__)

METRIC_DRAWN_TOTAL = "sampler/drawn_total"
METRIC_SKIPPED_TOTAL = "sampler/skipped_total"  # times a filtered prompt was passed over
METRIC_FILTERED_PROMPTS = "sampler/filtered_prompts"  # prompts the filter currently passes over
METRIC_RELEASED_TOTAL = "sampler/released_total"  # filtered prompts issued after max_skips
METRIC_IGNORED_OUTCOMES_TOTAL = "sampler/ignored_outcomes_total"
METRIC_INVALID_PROMPTS = "sampler/invalid_prompts"  # metadata rows dropped at construction

_STATE_VERSION = 1


@dataclass(frozen=True)
class PromptMeta:
    """The sampler's view of one data set row."""

    id: str
    task: str
    difficulty: str


def _pool_key(tasks: Sequence[str], difficulty: str) -> str:
    return f"{','.join(sorted(tasks))}|{difficulty}"


def _usable_rows(prompts: Sequence[PromptMeta]) -> tuple[list[PromptMeta], int]:
    """Usable rows in input order (known task and difficulty, first of each id) and the dropped count."""
    usable: list[PromptMeta] = []
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.task in TASKS and prompt.difficulty in DIFFICULTIES and prompt.id not in seen:
            seen.add(prompt.id)
            usable.append(prompt)
    dropped = len(prompts) - len(usable)
    if dropped:
        logger.warning("sampler: dropped %d prompt rows (unknown task/difficulty or repeated id)", dropped)
    return usable, dropped


class PromptSampler:
    """Deterministic, resumable prompt sampler following the current stage's data mix."""

    def __init__(
        self, *, prompts: Sequence[PromptMeta], stages: Sequence[StageConfig], config: SamplerConfig
    ) -> None:
        self.config = config
        self._stages = list(stages)
        valid, self._invalid = _usable_rows(prompts)
        self._known = {prompt.id for prompt in valid}
        # Per stage: (cumulative weight, pool key) for each difficulty it draws, in DIFFICULTIES order.
        self._choices: list[list[tuple[float, str]]] = []
        self._pools: dict[str, list[str]] = {}
        for index, stage in enumerate(self._stages):
            upper = 0.0
            choices = []
            for difficulty in DIFFICULTIES:
                weight = stage.difficulty_weights.get(difficulty, 0.0)
                if weight <= 0.0:
                    continue
                key = _pool_key(stage.tasks, difficulty)
                if key not in self._pools:
                    self._pools[key] = [
                        p.id for p in valid if p.difficulty == difficulty and p.task in stage.tasks
                    ]
                if not self._pools[key]:
                    raise ValueError(
                        f"stage {index} ({stage.name!r}) selects no prompt: none has task in "
                        f"{stage.tasks} and difficulty {difficulty!r} (weight {weight})"
                    )
                upper += weight
                choices.append((upper, key))
            self._choices.append(choices)

        self._rng = np.random.Generator(np.random.PCG64(config.seed))
        self._positions: dict[str, list[int]] = {key: [0, 0] for key in self._pools}  # [epoch, cursor]
        self._orders: dict[str, tuple[int, np.ndarray]] = {}  # cache: key -> (epoch, permutation)
        self._filter_stage: int | None = None
        self._outcomes: dict[str, deque[float]] = {}
        self._skips: dict[str, int] = {}
        self._drawn = 0
        self._skipped = 0
        self._released = 0
        self._ignored_outcomes = 0

    def draw(self, *, stage: int, count: int) -> list[str]:
        """Draw `count` prompt ids under stage `stage`'s data mix."""
        if not 0 <= stage < len(self._stages):
            raise ValueError(f"stage {stage} out of range for {len(self._stages)} stages")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if stage != self._filter_stage:
            # Spreads were measured under another stage's reward; they say nothing now.
            self._filter_stage = stage
            self._outcomes.clear()
            self._skips.clear()
        ids = [self._draw_one(stage) for _ in range(count)]
        self._drawn += count
        return ids

    def _draw_one(self, stage: int) -> str:
        choices = self._choices[stage]
        u = self._rng.random()
        # The last choice also catches u above a cumulative sum that rounding left just under 1.
        key = next((key for upper, key in choices if u < upper), choices[-1][1])
        while True:
            prompt_id = self._next_in_pool(key)
            if not self._is_filtered(prompt_id):
                self._skips.pop(prompt_id, None)
                return prompt_id
            skips = self._skips.get(prompt_id, 0)
            if skips >= self.config.max_skips:
                # Starvation cap: issue it and judge it afresh on its next outcomes.
                self._skips.pop(prompt_id, None)
                self._outcomes.pop(prompt_id, None)
                self._released += 1
                return prompt_id
            self._skips[prompt_id] = skips + 1
            self._skipped += 1

    def _next_in_pool(self, key: str) -> str:
        pool = self._pools[key]
        position = self._positions[key]
        if position[1] == len(pool):
            position[0] += 1
            position[1] = 0
        order = self._order(key, position[0])
        prompt_id = pool[int(order[position[1]])]
        position[1] += 1
        return prompt_id

    def _order(self, key: str, epoch: int) -> np.ndarray:
        cached = self._orders.get(key)
        if cached is None or cached[0] != epoch:
            # A seed from (seed, pool, epoch) makes the order independent of how many draws came before.
            rng = np.random.default_rng([self.config.seed, zlib.crc32(key.encode()), epoch])
            cached = (epoch, rng.permutation(len(self._pools[key])))
            self._orders[key] = cached
        return cached[1]

    def _is_filtered(self, prompt_id: str) -> bool:
        if not self.config.filter_solved:
            return False
        spreads = self._outcomes.get(prompt_id)
        if spreads is None or len(spreads) < self.config.history:
            return False
        return all(spread == 0.0 for spread in spreads)

    def record_outcome(self, prompt_id: str, rewards_of_group: Sequence[float], *, stage: int) -> None:
        """Record the total rewards of one group of `prompt_id`, sampled under stage `stage`.

        Outcomes of another stage, unknown ids, empty groups and non-finite rewards are counted in
        METRIC_IGNORED_OUTCOMES_TOTAL and dropped.
        """
        if not self.config.filter_solved:
            return
        try:
            rewards = np.asarray(rewards_of_group, dtype=np.float64)
        except (TypeError, ValueError):  # not numbers: a corrupt group
            rewards = np.empty(0)
        if (
            stage != self._filter_stage
            or prompt_id not in self._known
            or rewards.ndim != 1
            or rewards.size == 0
            or not np.all(np.isfinite(rewards))
        ):
            self._ignored_outcomes += 1
            return
        spread = float(rewards.max() - rewards.min())
        self._outcomes.setdefault(prompt_id, deque(maxlen=self.config.history)).append(spread)

    def metrics(self) -> dict[str, float]:
        filtered = sum(1 for prompt_id in self._outcomes if self._is_filtered(prompt_id))
        return {
            METRIC_DRAWN_TOTAL: float(self._drawn),
            METRIC_SKIPPED_TOTAL: float(self._skipped),
            METRIC_FILTERED_PROMPTS: float(filtered),
            METRIC_RELEASED_TOTAL: float(self._released),
            METRIC_IGNORED_OUTCOMES_TOTAL: float(self._ignored_outcomes),
            METRIC_INVALID_PROMPTS: float(self._invalid),
        }

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for key in sorted(self._pools):
            digest.update(key.encode())
            digest.update("\n".join(self._pools[key]).encode())
        return digest.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Data position (RNG state, per-pool epoch and cursor), filter state and counters; JSON-able."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.model_dump(),
            "fingerprint": self._fingerprint(),
            "rng": self._rng.bit_generator.state,
            "positions": {key: list(position) for key, position in self._positions.items()},
            "filter_stage": self._filter_stage,
            "outcomes": {prompt_id: list(spreads) for prompt_id, spreads in self._outcomes.items()},
            "skips": dict(self._skips),
            "drawn": self._drawn,
            "skipped": self._skipped,
            "released": self._released,
            "ignored_outcomes": self._ignored_outcomes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() taken over the same prompt table, stages and SamplerConfig."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state: version {state.get('version')!r} != {_STATE_VERSION}")
        saved = SamplerConfig.model_validate(state["config"])
        if saved != self.config:
            fields = SamplerConfig.model_fields
            changed = sorted(name for name in fields if getattr(saved, name) != getattr(self.config, name))
            raise ValueError(f"sampler state: saved under a different config; changed fields {changed}")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError("sampler state: saved over a different prompt table or stage data mix")
        if set(state["positions"]) != set(self._pools):
            raise ValueError(f"sampler state: pools {sorted(state['positions'])} != {sorted(self._pools)}")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = state["rng"]
        self._rng = rng
        self._positions = {
            key: [int(epoch), int(cursor)] for key, (epoch, cursor) in state["positions"].items()
        }
        self._orders = {}
        self._filter_stage = state["filter_stage"]
        self._outcomes = {
            prompt_id: deque((float(spread) for spread in spreads), maxlen=self.config.history)
            for prompt_id, spreads in state["outcomes"].items()
        }
        self._skips = {prompt_id: int(n) for prompt_id, n in state["skips"].items()}
        self._drawn = int(state["drawn"])
        self._skipped = int(state["skipped"])
        self._released = int(state["released"])
        self._ignored_outcomes = int(state["ignored_outcomes"])
