"""RunConfig: one validated document for a whole run, composed of each package's own config.

Each section is the config model that lives next to its component (rewards.config, curriculum.config,
learner.config, actors.config, models.config); this module owns only what is about wiring a run
(data paths, cluster resources, the training loop, metrics) and the checks that span sections.
Load with ``load_run_config(path, overrides)``: YAML → dotted overrides → validation, errors name the
field (deploy.config_loading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.config import RolloutConfig
from curriculum.config import CurriculumConfig, Difficulty
from deploy.config_loading import load_config
from deploy.sft import SFTConfig
from learner.config import LearnerConfig
from models.config import ModelConfig
from rewards.components import COMPONENTS as REWARD_COMPONENTS
from rewards.config import RewardConfig, check_computable

CONFIG_DIR = Path(__file__).parent / "configs"


class DataConfig(BaseModel):
    """Which data set a run trains and evaluates on."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        "artifacts/data/synth", description="directory of Parquet splits; generated there if synth is set"
    )
    synth: bool = Field(True, description="generate the synthetic camouflage set into path when it is missing")
    synth_seed: int = Field(0, ge=0, description="seed of the synthetic set")
    synth_n: int = Field(600, ge=10, le=10_000_000, description="synthetic images in all splits")
    train_split: str = Field("train", description="split name (file stem) used for training")
    train_limit: int | None = Field(
        None, ge=1, description="train (SFT and RL) on only the first N valid rows: the few-shot setting")
    train_difficulty: Difficulty | None = Field(
        None, description="train (SFT and RL) on only the training rows of this difficulty (before train_limit "
        "counts them): e.g. a model taught on easy images, then given a few hard ones")
    rl_mirror: bool = Field(
        False, description="RL: show every other prompt group mirrored left-right (image and boxes), views of "
        "the labelled images that SFT, which does not mirror, never saw")
    eval_splits: list[str] = Field(
        default_factory=lambda: ["test_easy", "test_hard"], min_length=1,
        description="splits evaluated at the end (train.eval_at_end=false evaluates none)"
    )
    max_bad_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="fail fast when more than this share of rows is unusable"
    )


class ClusterConfig(BaseModel):
    """Where the actors run and what each reserves (sized so nothing waits forever on a small node)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Ray address to attach to; None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None: all)")
    rollout_workers: int = Field(2, ge=1, le=1024, description="rollout worker actors at the start")
    min_rollout_workers: int = Field(1, ge=1, le=1024, description="`refocus scale` lower bound")
    max_rollout_workers: int = Field(64, ge=1, le=1024, description="`refocus scale` upper bound")
    reward_workers: int = Field(1, ge=1, le=1024, description="reward worker actors")
    rollout_cpus: float = Field(0.5, gt=0, le=1024, description="CPUs reserved by each rollout worker")
    rollout_gpus: float = Field(0.0, ge=0, le=64, description="GPUs reserved by each rollout worker")
    reward_cpus: float = Field(0.25, gt=0, le=1024, description="CPUs reserved by each reward worker")
    max_restarts: int = Field(3, ge=0, le=1000, description="Ray restarts of a dead rollout/reward worker")
    worker_start_timeout_s: float = Field(
        600.0, gt=0, le=86400,
        description="a rollout worker scaled up during a run that does not take calls within this many seconds (no "
        "room for it on the cluster, an engine that hangs) is stopped and counted; the run goes on without it")

    @model_validator(mode="after")
    def _workers_within_bounds(self) -> ClusterConfig:
        if not self.min_rollout_workers <= self.rollout_workers <= self.max_rollout_workers:
            raise ValueError(f"rollout_workers ({self.rollout_workers}) must lie within min_rollout_workers "
                             f"({self.min_rollout_workers}) and max_rollout_workers ({self.max_rollout_workers})")
        return self


class TrainConfig(BaseModel):
    """The training loop."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: generate → score → learn → sync weights; async: rollouts overlap learning"
    )
    steps: int = Field(20, ge=1, description="learner optimizer steps")
    prompts_per_step: int = Field(4, ge=1, description="prompt groups in one learner step")
    max_staleness: int = Field(
        1, ge=0, description="max policy versions a trained group may lag the learner (async mode)"
    )
    dynamic_sampling: bool = Field(True, description="drop groups whose rewards are all equal and refill")
    max_generation_factor: int = Field(
        4, ge=1, le=100,
        description="dynamic sampling: at most this × prompts_per_step groups generated (sync) or taken from the "
        "buffer (async) for one step; then zero-signal groups fill it",
    )
    buffer_capacity: int = Field(64, ge=1, description="groups the trajectory buffer holds before producers wait")
    verify_weight_sync: bool = Field(
        False, description="after each sync, check every rollout worker's weight checksum against the learner's"
    )
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    output_dir: str = Field("runs/default", description="checkpoints, metrics log and reports")
    eval_at_end: bool = Field(True, description="`refocus train`: evaluate the final checkpoint and write a report")
    eval_limit: int | None = Field(32, ge=1, description="rows per split evaluated at the end (None: all)")
    eval_modes: list[Literal["greedy", "sampled"]] = Field(
        default_factory=lambda: ["greedy", "sampled"], min_length=1,
        description="evaluation modes at the end: greedy (temperature 0) and/or sampled (the rollout's sampling)")

    @field_validator("eval_modes")
    @classmethod
    def _distinct_modes(cls, modes: list[str]) -> list[str]:
        if len(set(modes)) != len(modes):  # the evaluation at the end of a run refuses them, after SFT and RL
            raise ValueError(f"each mode at most once, got {modes}")
        return modes
    run_name: str = Field(
        "default", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="names the job's control actor: `refocus scale RUN_NAME --rollout-workers N`",
    )
    seed: int = Field(0, ge=0)


class MetricsConfig(BaseModel):
    """The Prometheus endpoint. Bound to loopback unless a host is configured."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address of /metrics")
    port: int = Field(0, ge=0, le=65535, description="port of /metrics (0: a free port, logged)")


class RunConfig(BaseModel):
    """Everything a run needs; every shipped YAML under deploy/configs validates into this."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sft: SFTConfig | None = Field(None, description="supervised warm start before RL (`refocus train` runs it first)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    def local_rollout_capacity(self) -> int | None:
        """The most rollout workers a local Ray of ``cluster.num_cpus`` CPUs places beside the learner and reward
        workers (``refocus scale`` asks no more: one that cannot be placed would never start); None when
        the run joins a cluster or takes all of this machine's CPUs, whose size is not known here."""
        cluster = self.cluster
        if cluster.address is not None or cluster.num_cpus is None:
            return None
        others = self.learner.world_size * self.learner.num_cpus_per_rank + cluster.reward_workers * cluster.reward_cpus
        return int((cluster.num_cpus - others) / cluster.rollout_cpus + 1e-9)

    @model_validator(mode="after")
    def _sections_agree(self) -> RunConfig:
        if self.learner.model_path is not None:
            raise ValueError("learner.model_path: leave unset in a run config; set model.path (one model per run)")
        if self.rollout.sampling.n < 2:
            raise ValueError("rollout.sampling.n: GRPO needs a group of at least 2 samples per prompt")
        if self.learner.temperature != self.rollout.sampling.temperature:
            # The ratio compares the learner's log-probs with the engine's, which are of the tempered
            # distribution: at another temperature every ratio is off by a factor that clipping then cuts.
            raise ValueError(
                f"learner.temperature ({self.learner.temperature}) must equal rollout.sampling.temperature "
                f"({self.rollout.sampling.temperature}): the engine reports log-probs of the tempered distribution"
            )
        if self.rollout.sampling.top_p < 1.0 and self.learner.old_logprobs == "behaviour":
            # The engines report log-probs renormalised over the nucleus; the learner's are of the whole
            # distribution, so every ratio would start below 1 by the nucleus' mass, which the low clip then cuts.
            raise ValueError(
                f"rollout.sampling.top_p ({self.rollout.sampling.top_p}) < 1 needs learner.old_logprobs=recompute: "
                "the engine's behaviour log-probs are renormalised over the top-p nucleus, the learner's are not"
            )
        tp, gpus = self.rollout.engine.tensor_parallel_size, self.cluster.rollout_gpus
        if tp > 1 and gpus > 0 and gpus != tp:
            # Ray shows an actor only the GPUs it reserved (CUDA_VISIBLE_DEVICES): an engine spanning more finds
            # too few devices, and one spanning fewer leaves reserved GPUs idle.
            raise ValueError(
                f"rollout.engine.tensor_parallel_size ({tp}) must equal cluster.rollout_gpus ({gpus:g}) on GPUs: each "
                "rollout worker runs one engine on the GPUs it reserves"
            )
        if self.rewards.frame.kind != self.rollout.prompt.frame:
            raise ValueError(
                f"rewards.frame.kind ({self.rewards.frame.kind}) must equal rollout.prompt.frame "
                f"({self.rollout.prompt.frame}): the prompt tells the model the frame the rewards read"
            )
        if self.train.buffer_capacity < self.train.prompts_per_step:
            raise ValueError(
                f"train.buffer_capacity ({self.train.buffer_capacity}) must hold one step's "
                f"train.prompts_per_step ({self.train.prompts_per_step}) groups"
            )
        samples = self.train.prompts_per_step * self.rollout.sampling.n
        if self.learner.global_batch_samples != samples:
            raise ValueError(
                f"learner.global_batch_samples ({self.learner.global_batch_samples}) must equal "
                f"train.prompts_per_step × rollout.sampling.n ({samples})"
            )
        if self.learner.schedule != "constant" and self.learner.max_steps != self.train.steps:
            # One RL step is one optimiser step: a decay that ends elsewhere stops early or never gets low.
            raise ValueError(
                f"learner.max_steps ({self.learner.max_steps}) must equal train.steps ({self.train.steps}) "
                f"when learner.schedule is {self.learner.schedule!r}: the decay ends at max_steps"
            )
        engine = self.rollout.engine
        if self.train.verify_weight_sync and engine.backend == "vllm" and not engine.track_checksum:
            raise ValueError("train.verify_weight_sync compares vLLM's checksum of the weights it loaded: it needs "
                             "rollout.engine.track_checksum=true")
        cluster = self.cluster
        if cluster.address is None and cluster.num_cpus is not None:
            # A local Ray of num_cpus CPUs: an actor that does not fit waits for them forever (the learner's
            # placement group stays pending), so the run would hang instead of failing.
            learner = self.learner.world_size * self.learner.num_cpus_per_rank
            rl = learner + cluster.rollout_workers * cluster.rollout_cpus + cluster.reward_workers * cluster.reward_cpus
            if rl > cluster.num_cpus:
                raise ValueError(
                    f"cluster.num_cpus ({cluster.num_cpus}) cannot hold RL's actors: {rl:g} CPUs (learner "
                    f"{self.learner.world_size} x {self.learner.num_cpus_per_rank:g}, rollout "
                    f"{cluster.rollout_workers} x {cluster.rollout_cpus:g}, reward {cluster.reward_workers} x "
                    f"{cluster.reward_cpus:g})")
            sft_rank = self.sft.num_cpus_per_rank if self.sft is not None else None
            if sft_rank is not None and self.learner.world_size * sft_rank > cluster.num_cpus:
                raise ValueError(f"sft.num_cpus_per_rank ({sft_rank:g}) x learner.world_size "
                                 f"({self.learner.world_size}) exceeds cluster.num_cpus ({cluster.num_cpus})")
        if self.train.prompts_per_step % self.cluster.rollout_workers:
            raise ValueError(
                f"train.prompts_per_step ({self.train.prompts_per_step}) must divide evenly across "
                f"cluster.rollout_workers ({self.cluster.rollout_workers})"
            )
        if self.sft is not None and self.sft.batch_samples % (self.learner.world_size * self.sft.micro_batch_samples):
            raise ValueError(
                f"sft.batch_samples ({self.sft.batch_samples}) must be divisible by learner.world_size × "
                f"sft.micro_batch_samples ({self.learner.world_size} × {self.sft.micro_batch_samples})")
        if self.sft is not None and self.sft.zoom_context is not None and self.rollout.env.max_turns < 2:
            raise ValueError(f"sft.zoom_context ({self.sft.zoom_context}) teaches zoom turns: it needs "
                             f"rollout.env.max_turns >= 2 (got {self.rollout.env.max_turns})")
        overlong = self.rewards.overlong
        longest = min(self.rollout.env.max_turns * self.rollout.sampling.max_tokens, self.rollout.env.max_completion_tokens)
        if overlong is not None and overlong.l_max - overlong.l_cache >= longest:
            # The penalty counts the model's own tokens, at most max_tokens per turn (and fewer than the
            # completion budget, which the environment's turns share): set where no completion reaches, it is 0.
            raise ValueError(
                f"rewards.overlong: its ramp starts at l_max - l_cache = {overlong.l_max - overlong.l_cache} tokens, "
                f"but a completion holds at most {longest} model tokens (rollout.env.max_turns × "
                f"rollout.sampling.max_tokens, within rollout.env.max_completion_tokens): it could never apply")
        for index, stage in enumerate(self.curriculum.stages):
            unknown = set(stage.reward_weights) - set(REWARD_COMPONENTS)
            if unknown:
                raise ValueError(f"curriculum.stages.{index}.reward_weights: unknown components {sorted(unknown)}")
            check_computable(self.rewards, stage.reward_weights, where=f"curriculum.stages.{index}")
            drawn = sorted(d for d, weight in stage.difficulty_weights.items() if weight > 0)
            if self.data.train_difficulty is not None and drawn != [self.data.train_difficulty]:
                # Caught here, not when RL's sampler finds the pool empty (after SFT has run).
                raise ValueError(
                    f"curriculum.stages.{index}.difficulty_weights draws {drawn}, but data.train_difficulty keeps "
                    f"only {self.data.train_difficulty!r} rows: give the other difficulty weight 0")
        return self


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config (YAML path or None for all defaults) with dotted ``overrides``."""
    return load_config(RunConfig, path, overrides)


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))
