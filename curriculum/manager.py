"""The curriculum's state: which stage runs, what it rewards and draws, and when it advances.

The learner calls observe() once per training step with the stage reward (the mean total reward, under
the current stage's weights, of the groups drawn for that step: those trained on and those dynamic sampling
set aside for want of signal, so that a stage the policy masters shows it). The manager feeds it to the
stage's PlateauDetector and moves to the next stage when the detector says so, when the stage's
max_steps runs out, or when an operator calls force_advance(). The last stage never advances; its
detector still runs so the smoothed reward stays visible in the metrics.

state_dict() holds the stage index, the transitions so far and the detector's whole state as plain
JSON-able types, so it goes into the learner's checkpoint and a resumed run makes the same decisions.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from curriculum.config import CurriculumConfig, StageConfig
from curriculum.plateau import PlateauDetector

logger = logging.getLogger(__name__)

METRIC_STAGE = "curriculum/stage"
METRIC_STEPS_IN_STAGE = "curriculum/steps_in_stage"
METRIC_SMOOTHED_REWARD = "curriculum/smoothed_reward"
METRIC_IMPROVEMENT = "curriculum/improvement"
METRIC_PLATEAU_STREAK = "curriculum/plateau_streak"
METRIC_TRANSITIONS_TOTAL = "curriculum/transitions_total"
METRIC_NONFINITE_REWARDS_TOTAL = "curriculum/nonfinite_rewards_total"
METRIC_OTHER_STAGE_REWARDS_TOTAL = "curriculum/other_stage_rewards_total"

REASON_MANUAL = "manual"

_STATE_VERSION = 1


@dataclass(frozen=True)
class Transition:
    """One stage change, with the evidence that justified it (JSON-able via dataclasses.asdict)."""

    from_stage: int
    to_stage: int
    from_name: str
    to_name: str
    step: int | None  # global training step of the last observation before the change
    steps_in_stage: int  # observations made in the stage being left
    reason: str  # plateau / max_steps / "manual: <operator's reason>"
    evidence: dict[str, Any]


@dataclass(frozen=True)
class DataMix:
    """What the prompt sampler should draw in the current stage."""

    tasks: tuple[str, ...]
    difficulty_weights: dict[str, float]


class CurriculumManager:
    """Owns the current stage; see the module docstring for the protocol."""

    def __init__(self, config: CurriculumConfig) -> None:
        self.config = config
        self._stage = config.start_stage
        self._detector = PlateauDetector(self.stage_config.advance)
        self._last_step: int | None = None
        self._transitions: list[Transition] = []
        self._nonfinite_rewards = 0
        self._other_stage_rewards = 0

    @property
    def current_stage(self) -> int:
        """Index of the running stage in config.stages."""
        return self._stage

    @property
    def stage_config(self) -> StageConfig:
        return self.config.stages[self._stage]

    @property
    def is_last_stage(self) -> bool:
        return self._stage == len(self.config.stages) - 1

    @property
    def transitions(self) -> list[Transition]:
        """Every transition so far, oldest first."""
        return list(self._transitions)

    def reward_weights(self) -> dict[str, float]:
        """Weight per reward component in the current stage (components not named weigh 0)."""
        return dict(self.stage_config.reward_weights)

    def data_mix(self) -> DataMix:
        stage = self.stage_config
        return DataMix(tasks=tuple(stage.tasks), difficulty_weights=dict(stage.difficulty_weights))

    def observe(self, *, step: int, stage_reward: float, stage: int | None = None) -> Transition | None:
        """Record one training step's stage reward; return the Transition if the stage changed.

        step: global training step, strictly increasing across calls.
        stage: the stage the reward was earned under, when the caller knows it. In an asynchronous
            run, groups issued before a transition are still trained on after it; their reward was
            earned under other weights and must not move the new stage's trend, so a reward whose
            stage differs from current_stage is counted and dropped. Non-finite rewards are likewise
            counted and dropped: one bad batch must not end a run.
        """
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase: got {step} after {self._last_step}")
        self._last_step = step
        if stage is not None and stage != self._stage:
            self._other_stage_rewards += 1
            logger.debug(
                "curriculum: dropped reward of stage %d at step %d (now %d)", stage, step, self._stage
            )
            return None
        if not math.isfinite(stage_reward):
            self._nonfinite_rewards += 1
            logger.warning("curriculum: dropped non-finite stage reward %r at step %d", stage_reward, step)
            return None
        reason = self._detector.update(stage_reward)
        if reason is None or self.is_last_stage:
            return None
        return self._advance(reason=reason)

    def force_advance(self, reason: str) -> Transition:
        """Operator override: leave the current stage now, recording `reason`."""
        if self.is_last_stage:
            raise ValueError(
                f"force_advance: stage {self._stage} ({self.stage_config.name!r}) is the last stage"
            )
        return self._advance(reason=f"{REASON_MANUAL}: {reason}")

    def _advance(self, *, reason: str) -> Transition:
        old, new = self._stage, self._stage + 1
        transition = Transition(
            from_stage=old,
            to_stage=new,
            from_name=self.config.stages[old].name,
            to_name=self.config.stages[new].name,
            step=self._last_step,
            steps_in_stage=self._detector.steps,
            reason=reason,
            evidence=self._detector.evidence(),
        )
        self._transitions.append(transition)
        self._stage = new
        self._detector = PlateauDetector(self.stage_config.advance)
        logger.info(
            "curriculum: stage %d (%s) -> %d (%s) at step %s after %d steps, reason %s; evidence %s",
            old,
            transition.from_name,
            new,
            transition.to_name,
            transition.step,
            transition.steps_in_stage,
            reason,
            json.dumps(transition.evidence),
        )
        return transition

    def metrics(self) -> dict[str, float]:
        """Current figures; smoothed reward and improvement are NaN until the detector has them."""
        smoothed = self._detector.smoothed
        improvement = self._detector.improvement
        return {
            METRIC_STAGE: float(self._stage),
            METRIC_STEPS_IN_STAGE: float(self._detector.steps),
            METRIC_SMOOTHED_REWARD: math.nan if smoothed is None else smoothed,
            METRIC_IMPROVEMENT: math.nan if improvement is None else improvement,
            METRIC_PLATEAU_STREAK: float(self._detector.streak),
            METRIC_TRANSITIONS_TOTAL: float(len(self._transitions)),
            METRIC_NONFINITE_REWARDS_TOTAL: float(self._nonfinite_rewards),
            METRIC_OTHER_STAGE_REWARDS_TOTAL: float(self._other_stage_rewards),
        }

    def state_dict(self) -> dict[str, Any]:
        """Stage, transitions, counters and the detector's whole state, as plain JSON-able types."""
        return {
            "version": _STATE_VERSION,
            "stage_names": [stage.name for stage in self.config.stages],
            "stage": self._stage,
            "last_step": self._last_step,
            "transitions": [asdict(transition) for transition in self._transitions],
            "nonfinite_rewards": self._nonfinite_rewards,
            "other_stage_rewards": self._other_stage_rewards,
            "detector": self._detector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict() saved with the same stage names; the checkpoint's stage wins."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"curriculum state: version {state.get('version')!r} != {_STATE_VERSION}")
        names = [stage.name for stage in self.config.stages]
        if state["stage_names"] != names:
            raise ValueError(
                f"curriculum state: saved for stages {state['stage_names']}, config has {names}"
            )
        stage = int(state["stage"])
        if not 0 <= stage < len(names):
            raise ValueError(f"curriculum state: stage {stage} out of range for {len(names)} stages")
        detector = PlateauDetector(self.config.stages[stage].advance)
        detector.load_state_dict(state["detector"])
        self._stage = stage
        self._detector = detector
        self._last_step = state["last_step"]
        self._transitions = [Transition(**record) for record in state["transitions"]]
        self._nonfinite_rewards = int(state["nonfinite_rewards"])
        self._other_stage_rewards = int(state["other_stage_rewards"])
