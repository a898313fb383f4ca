"""Plateau detection on a noisy per-step reward: decides when a curriculum stage stops improving.

The rule, exactly (t counts the rewards fed in this stage from 1; w = window):

    smoothed   s_t  "ma":  mean(r_{t-w+1} .. r_t)                              defined for t >= w
                    "ema": s_w = mean(r_1 .. r_w), then s_t = s_{t-1} + a * (r_t - s_{t-1}),
                           a = 2 / (w + 1)                                      defined for t >= w
    baseline   b_t  = max{ s_u : w <= u <= t - w }  (best smoothed value >= w steps ago; t >= 2w)
    improvement i_t = s_t - b_t
    streak     k_t  = number of consecutive steps up to t with i_t <= delta (any i_t > delta resets it)

    advance "plateau"   at the first t with k_t >= patience and t >= min_steps
    advance "max_steps" at t = max_steps when no plateau was found first (a safety stop)

The streak counts before min_steps too: min_steps is a floor on the stage's length, not a delay of the
patience count. A stage that was flat all along therefore ends at max(min_steps, 2w + patience - 1): the
improvement exists from t = 2w, so a streak reaches patience at t = 2w + patience - 1 at the earliest (with
the defaults w = 50, patience = 20, min_steps = 100: at step 119, not 100).

Why this is robust to noise:
- Smoothing over w steps divides the per-step noise's standard deviation by ~sqrt(w).
- For "ma" the two values compared, s_t and any s_u with u <= t - w, average disjoint windows: the
  improvement measures progress over at least a full window of fresh data, not step-to-step jitter
  of overlapping averages (the EMA's a = 2 / (w + 1) gives it the same mean lag as the MA).
- The baseline is the BEST earlier value, not the one exactly w steps back: a dip followed by a
  recovery to an earlier level is not progress, and a lucky high stretch raises the bar instead of
  letting later noise look like gains. On a flat trace i_t is therefore mostly negative; on a trace
  that rises by more than delta per window it stays positive apart from rare noise excursions.
- patience consecutive steps are required, so one low reading never ends a stage.

Rewards fed here must be finite; the manager counts and drops non-finite ones before they arrive.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from curriculum.config import PlateauConfig

REASON_PLATEAU = "plateau"
REASON_MAX_STEPS = "max_steps"

# How many of the latest (step, smoothed, baseline, improvement) records evidence() carries: enough to
# show the streak's shape in a log line; the streak length and its largest improvement prove the rest.
EVIDENCE_RECORDS = 10

_STATE_VERSION = 1


class PlateauDetector:
    """Feed one stage reward per step with update(); it says when the stage has plateaued."""

    def __init__(self, config: PlateauConfig) -> None:
        self.config = config
        self._alpha = 2.0 / (config.window + 1)
        self._steps = 0
        self._raw: deque[float] = deque(maxlen=config.window)  # last w rewards
        self._smoothed: float | None = None
        # Smoothed values not yet w steps old, as (step, value); they join the baseline when they are.
        self._pending: deque[tuple[int, float]] = deque()
        self._best: tuple[int, float] | None = None  # (step, value) of the baseline b_t
        self._improvement: float | None = None
        self._streak = 0
        self._streak_max_improvement: float | None = None  # largest i_t within the current streak
        self._recent: deque[dict[str, Any]] = deque(maxlen=EVIDENCE_RECORDS)
        self._decision: str | None = None

    @property
    def steps(self) -> int:
        """Rewards fed so far in this stage."""
        return self._steps

    @property
    def smoothed(self) -> float | None:
        """Current smoothed reward s_t, None until a full window has been seen."""
        return self._smoothed

    @property
    def improvement(self) -> float | None:
        """Current improvement i_t, None until 2 * window rewards have been seen."""
        return self._improvement

    @property
    def streak(self) -> int:
        """Consecutive steps with improvement <= delta."""
        return self._streak

    def update(self, reward: float) -> str | None:
        """Feed one step's stage reward; return REASON_PLATEAU / REASON_MAX_STEPS to advance, else None.

        Once a reason is returned the caller is expected to leave the stage; further updates keep
        applying the same rule (so max_steps keeps answering REASON_MAX_STEPS).
        """
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward!r}")
        cfg = self.config
        self._steps += 1
        self._raw.append(reward)
        if self._steps >= cfg.window:
            self._smooth(reward)
            self._compare()
        self._decision = self._decide()
        return self._decision

    def _smooth(self, reward: float) -> None:
        cfg = self.config
        if cfg.smoothing == "ma" or self._smoothed is None:
            # fsum: exactly rounded, so the value does not depend on the summation order.
            self._smoothed = math.fsum(self._raw) / cfg.window
        else:
            self._smoothed = self._smoothed + self._alpha * (reward - self._smoothed)
        self._pending.append((self._steps, self._smoothed))
        if len(self._pending) > cfg.window:
            step, value = self._pending.popleft()  # now exactly w steps old
            if self._best is None or value > self._best[1]:
                self._best = (step, value)

    def _compare(self) -> None:
        if self._best is None:
            return
        assert self._smoothed is not None
        self._improvement = self._smoothed - self._best[1]
        # <=: with delta 0 a flat stage (improvement exactly 0) must still plateau.
        if self._improvement <= self.config.delta:
            self._streak += 1
            if self._streak_max_improvement is None or self._improvement > self._streak_max_improvement:
                self._streak_max_improvement = self._improvement
        else:
            self._streak = 0
            self._streak_max_improvement = None
        self._recent.append(
            {
                "step": self._steps,
                "smoothed": self._smoothed,
                "baseline": self._best[1],
                "improvement": self._improvement,
            }
        )

    def _decide(self) -> str | None:
        cfg = self.config
        if self._streak >= cfg.patience and self._steps >= cfg.min_steps:
            return REASON_PLATEAU
        if self._steps >= cfg.max_steps:
            return REASON_MAX_STEPS
        return None

    def evidence(self) -> dict[str, Any]:
        """What the latest decision rests on: the rule's parameters, the current values, recent records."""
        cfg = self.config
        return {
            "decision": self._decision,
            "steps": self._steps,
            "smoothing": cfg.smoothing,
            "window": cfg.window,
            "delta": cfg.delta,
            "patience": cfg.patience,
            "min_steps": cfg.min_steps,
            "max_steps": cfg.max_steps,
            "smoothed": self._smoothed,
            "baseline": None if self._best is None else self._best[1],
            "baseline_step": None if self._best is None else self._best[0],
            "improvement": self._improvement,
            "streak": self._streak,
            "streak_max_improvement": self._streak_max_improvement,
            "recent": [dict(record) for record in self._recent],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as plain JSON-able types."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.model_dump(),
            "steps": self._steps,
            "raw": list(self._raw),
            "smoothed": self._smoothed,
            "pending": [[step, value] for step, value in self._pending],
            "best": None if self._best is None else [self._best[0], self._best[1]],
            "improvement": self._improvement,
            "streak": self._streak,
            "streak_max_improvement": self._streak_max_improvement,
            "recent": [dict(record) for record in self._recent],
            "decision": self._decision,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() taken with the same PlateauConfig (a different rule is refused)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"plateau state: version {state.get('version')!r} != {_STATE_VERSION}")
        saved = PlateauConfig.model_validate(state["config"])
        if saved != self.config:
            fields = PlateauConfig.model_fields
            changed = sorted(name for name in fields if getattr(saved, name) != getattr(self.config, name))
            raise ValueError(f"plateau state: saved under a different rule; changed fields {changed}")
        raw = [float(value) for value in state["raw"]]
        if len(raw) > self.config.window:
            raise ValueError(f"plateau state: raw holds {len(raw)} values > window {self.config.window}")
        self._steps = int(state["steps"])
        self._raw = deque(raw, maxlen=self.config.window)
        self._smoothed = state["smoothed"]
        self._pending = deque((int(step), float(value)) for step, value in state["pending"])
        best = state["best"]
        self._best = None if best is None else (int(best[0]), float(best[1]))
        self._improvement = state["improvement"]
        self._streak = int(state["streak"])
        self._streak_max_improvement = state["streak_max_improvement"]
        self._recent = deque((dict(record) for record in state["recent"]), maxlen=EVIDENCE_RECORDS)
        self._decision = state["decision"]
