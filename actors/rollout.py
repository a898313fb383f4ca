"""RolloutWorker: prompt groups in, sampled (multi-turn) trajectory groups out. No rewards here.

A plain class (the driver wraps it with ``ray.remote``), owning one engine. One call of
``generate_groups`` samples every prompt's ``n`` first turns in ONE engine call, then serves zoom
requests turn by turn: all samples that asked for a zoom continue together in one engine call per
turn (one sample each, continuing from their exact tokens). Token layout and masks follow
``actors.types``: model tokens carry their behaviour log-prob and loss_mask 1, environment tokens
log-prob 0.0 and loss_mask 0.

Budgets: a turn generates at most ``sampling.max_tokens``, a whole completion (model + environment
tokens) at most ``env.max_completion_tokens``, and prompt + completion fit ``engine.max_model_len``.
A zoom that would not fit ends the sample with finish_reason "length"; a zoom requested on the last
allowed turn ends it with "turns".
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from actors.config import RolloutConfig
from actors.engines import EngineRequest, EngineSample, RolloutEngine, build_engine
from actors.engines.base import FINISH_LENGTH, FINISH_STOP
from actors.env import BAD_ZOOM, NO_ZOOM, ZOOM_STOP, Episode, ZoomEnv, encode_png, parse_zoom
from actors.types import PromptGroup, Trajectory, TrajectoryGroup

log = logging.getLogger(__name__)

FINISH_TURNS = "turns"  # the last allowed turn asked for another zoom
FINISH_BAD_ZOOM = "bad_zoom"  # a malformed zoom request ended the sample (its box unreadable or empty)

# Counters of stats() (cumulative over the worker's life).
STAT_GROUPS = "rollout/groups"
STAT_SAMPLES = "rollout/samples"
STAT_TOKENS = "rollout/tokens_generated"  # model tokens (loss_mask 1)
STAT_ENV_TOKENS = "rollout/env_tokens"  # environment-inserted tokens
STAT_TURNS = "rollout/turns"  # model turns over all samples
STAT_ZOOMS = "rollout/zooms"  # zoom requests served
STAT_BAD_ZOOMS = "rollout/bad_zooms"  # malformed zoom requests (the sample ends there)
STAT_BAD_PROMPTS = "rollout/bad_prompts"  # prompt groups skipped: bad image, or prompt longer than the context
STAT_GENERATE_SECONDS = "rollout/generate_seconds"  # wall time inside engine.generate
STAT_ENV_SECONDS = "rollout/env_seconds"  # wall time outside it (prompts, crops, bookkeeping)
STAT_WEIGHT_VERSION = "rollout/weight_version"  # a gauge: version of the weights held now

# Keys of TrajectoryGroup.timings: seconds of the generate_groups call the group was sampled in
# (groups of one call share one batched engine call, so they share these figures).
TIMING_GENERATE = "generate"
TIMING_ENV = "env"

# An engine call seeds its sequences s, s+1, ... (s a multiple of this): two calls' seeds overlap only where their
# 32-bit streams (RolloutWorker._seed) are equal.
_SEED_STRIDE = 1 << 20


@dataclass
class TrajectoryBuilder:
    """A trajectory being built, turn by turn: model turns (trained on) and environment turns (not).

    SFT builds its targets with it too (``deploy.sft``), teacher-forcing the model turns, so a target
    trajectory has exactly a rollout's layout."""

    prompt_ids: list[int]
    episode: Episode
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    zoom_images: list = field(default_factory=list)  # PIL crops as shown
    turns: int = 0
    finish_reason: str = FINISH_STOP

    def add_model_turn(self, sample: EngineSample) -> None:
        self.completion_ids += sample.token_ids
        self.logprobs += sample.logprobs
        self.loss_mask += [1] * len(sample.token_ids)
        self.texts.append(sample.text)
        self.turns += 1

    def add_env_turn(self, token_ids: list[int], image) -> None:
        self.completion_ids += token_ids
        self.logprobs += [0.0] * len(token_ids)
        self.loss_mask += [0] * len(token_ids)
        self.zoom_images.append(image)

    def request(self) -> EngineRequest:
        return EngineRequest(prompt_ids=self.prompt_ids + self.completion_ids,
                             images=[self.episode.image, *self.zoom_images])

    def trajectory(self, index: int) -> Trajectory:
        return Trajectory(
            sample_index=index,
            prompt_ids=self.prompt_ids,
            completion_ids=self.completion_ids,
            behaviour_logprobs=self.logprobs,
            loss_mask=self.loss_mask,
            completion_text="".join(self.texts),
            zoom_images=[encode_png(image) for image in self.zoom_images],
            zoom_boxes=[[float(v) for v in box] for box in self.episode.zoom_boxes],
            finish_reason=self.finish_reason,
        )


class RolloutWorker:
    """Samples trajectory groups with one engine and the zoom environment."""

    def __init__(self, *, config: RolloutConfig, model_path: str, worker_id: str = "rollout-0",
                 engine: RolloutEngine | None = None):
        """``engine`` defaults to the one ``config.engine`` describes on ``model_path`` (tests pass their own)."""
        from models.processor import load_processor

        self.config = config
        self.worker_id = worker_id
        self.env = ZoomEnv(config=config.env, prompt=config.prompt, processor=load_processor(model_path))
        self.engine = engine if engine is not None else build_engine(config.engine, model_path=model_path)
        self._calls = 0
        self._stats: Counter[str] = Counter()

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def load_weights(self, named_tensors: Iterable[tuple[str, object]], *, version: int) -> None:
        """New policy weights (HF state-dict names; torch tensors or numpy arrays)."""
        self.engine.load_weights(named_tensors, version=version)

    def weights_checksum(self) -> str:
        return self.engine.weights_checksum()

    def stats(self) -> dict[str, float]:
        """Cumulative counters (``STAT_*`` names) and the current weight version."""
        return {**{name: float(value) for name, value in self._stats.items()},
                STAT_WEIGHT_VERSION: float(self.engine.weight_version)}

    def close(self) -> None:
        self.engine.close()

    def _seed(self, turn: int) -> int | None:
        """The seed of this worker's current call at ``turn``: a function of the base seed, the worker's id, the
        call count and the turn. The id is in it because every worker counts its calls from 0: without it two
        workers' call c would draw their samples from the same random streams."""
        base = self.config.sampling.seed
        if base is None:
            return None
        stream = np.random.SeedSequence([base, zlib.crc32(self.worker_id.encode()), self._calls, turn])
        return int(stream.generate_state(1, np.uint32)[0]) * _SEED_STRIDE  # < 2**52

    def _room(self, sample: TrajectoryBuilder) -> int:
        """Tokens ``sample`` may still add: the completion budget and the engine's context length."""
        return min(self.config.env.max_completion_tokens - len(sample.completion_ids),
                   self.config.engine.max_model_len - len(sample.prompt_ids) - len(sample.completion_ids))

    def _turn_limit(self, sample: TrajectoryBuilder) -> int:
        """Tokens the next model turn of ``sample`` may generate."""
        return min(self.config.sampling.max_tokens, self._room(sample))

    def generate_groups(self, prompts: list[PromptGroup]) -> list[TrajectoryGroup]:
        """One trajectory group per prompt (prompts with a corrupt image, or too long for the engine's
        context, are counted and skipped: the driver drops them as bad prompts)."""
        start = time.perf_counter()
        generate_seconds = 0.0
        version = self.engine.weight_version
        sampling = self.config.sampling
        stop = [ZOOM_STOP] if self.config.env.max_turns > 1 else []

        kept: list[PromptGroup] = []
        groups: list[list[TrajectoryBuilder]] = []
        for prompt in prompts:
            try:
                prompt_ids, episode = self.env.reset(prompt)
            except ValueError as error:
                log.warning("skipping prompt group %s: %s", prompt.group_id, error)
                self._stats[STAT_BAD_PROMPTS] += 1
                continue
            samples = [TrajectoryBuilder(prompt_ids=prompt_ids,
                                         episode=Episode(image=episode.image, frame=episode.frame))
                       for _ in range(sampling.n)]
            if self._room(samples[0]) < 1:  # e.g. an overlong question: skip this prompt, not the whole call
                log.warning("skipping prompt group %s: its %d prompt tokens leave no room in engine.max_model_len "
                            "(%d)", prompt.group_id, len(prompt_ids), self.config.engine.max_model_len)
                self._stats[STAT_BAD_PROMPTS] += 1
                continue
            kept.append(prompt)
            groups.append(samples)

        # Turn 1: all prompts in one call, n samples each.
        pending: list[TrajectoryBuilder] = []
        if groups:
            t = time.perf_counter()
            outputs = self.engine.generate(
                [group[0].request() for group in groups], n=sampling.n, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=[self._turn_limit(group[0]) for group in groups], stop=stop,
                seed=self._seed(0))
            generate_seconds += time.perf_counter() - t
            for group, samples_out in zip(groups, outputs):
                for sample, out in zip(group, samples_out):
                    if self._after_turn(sample, out):
                        pending.append(sample)
        # Later turns: every sample that zoomed continues, one sample each.
        turn = 1
        while pending:
            t = time.perf_counter()
            outputs = self.engine.generate(
                [sample.request() for sample in pending], n=1, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=[self._turn_limit(sample) for sample in pending], stop=stop,
                seed=self._seed(turn))
            generate_seconds += time.perf_counter() - t
            pending = [sample for sample, out in zip(pending, outputs) if self._after_turn(sample, out[0])]
            turn += 1

        env_seconds = time.perf_counter() - start - generate_seconds
        timings = {TIMING_GENERATE: generate_seconds, TIMING_ENV: env_seconds}
        result = [TrajectoryGroup(prompt=prompt, trajectories=[s.trajectory(i) for i, s in enumerate(samples)],
                                  policy_version=version, worker_id=self.worker_id, timings=dict(timings))
                  for prompt, samples in zip(kept, groups)]
        self._calls += 1
        self._stats[STAT_GROUPS] += len(result)
        self._stats[STAT_SAMPLES] += sum(len(samples) for samples in groups)
        self._stats[STAT_TOKENS] += sum(sum(s.loss_mask) for samples in groups for s in samples)
        self._stats[STAT_ENV_TOKENS] += sum(s.loss_mask.count(0) for samples in groups for s in samples)
        self._stats[STAT_TURNS] += sum(s.turns for samples in groups for s in samples)
        self._stats[STAT_GENERATE_SECONDS] += generate_seconds
        self._stats[STAT_ENV_SECONDS] += env_seconds
        return result

    def _after_turn(self, sample: TrajectoryBuilder, out: EngineSample) -> bool:
        """Record a model turn; serve its zoom request if any. True when the sample continues."""
        sample.add_model_turn(out)
        if out.finish_reason == FINISH_LENGTH:
            sample.finish_reason = FINISH_LENGTH
            return False
        outcome, box = parse_zoom(out.text) if self.config.env.max_turns > 1 else (NO_ZOOM, None)
        if outcome == NO_ZOOM:
            sample.finish_reason = FINISH_STOP
            return False
        if outcome == BAD_ZOOM:
            self._stats[STAT_BAD_ZOOMS] += 1
            sample.finish_reason = FINISH_BAD_ZOOM
            return False
        if sample.turns >= self.config.env.max_turns:
            sample.finish_reason = FINISH_TURNS
            return False
        observation = self.env.step(sample.episode, box, last_token=out.token_ids[-1] if out.token_ids else None)
        if self._room(sample) - len(observation.token_ids) < 1:  # no room to show the crop and go on
            sample.finish_reason = FINISH_LENGTH
            return False
        sample.episode.advance(observation)
        sample.add_env_turn(observation.token_ids, observation.image)
        self._stats[STAT_ZOOMS] += 1
        return True
