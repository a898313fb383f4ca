"""Configuration of the learner: model, backend, batch geometry, optimiser, schedule and GRPO loss."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.config import CpuLists, parse_cpu_list


class LoraSpec(BaseModel):
    """Low-rank adapters instead of full fine-tuning (needs the ``peft`` package: extra ``lora``)."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, ge=1, le=1024, description="rank r of the adapter matrices")
    alpha: float = Field(default=32.0, gt=0.0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="module-name suffixes that get adapters (peft's target_modules)",
    )


class LearnerConfig(BaseModel):
    """Everything one learner rank needs; identical on every rank of a group."""

    # No inf or NaN anywhere: kl_coef .inf made the loss NaN from the first step (inf × a KL of 0), advantage_eps .inf
    # every advantage 0.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model_path: str | None = Field(
        default=None, min_length=1,
        description="Hugging Face Qwen2.5-VL directory; in a run config leave it unset: the driver passes the "
        "run's one model (RunConfig.model), so rollout and learner can never start from different weights",
    )
    backend: Literal["deepspeed", "torch"] = Field(
        default="deepspeed",
        description="deepspeed: ZeRO engine, any world size; torch: one plain process, for debugging only",
    )
    zero_stage: int = Field(default=3, ge=0, le=3, description="DeepSpeed ZeRO stage (deepspeed backend only)")
    world_size: int = Field(default=1, ge=1, le=4096, description="number of learner ranks (data parallel)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when torch sees a GPU, else CPU (gloo)")
    num_cpus_per_rank: float = Field(default=1.0, gt=0.0, le=1024,
                                     description="CPUs Ray reserves for each learner actor")
    num_gpus_per_rank: float = Field(default=0.0, ge=0.0, le=64,
                                     description="GPUs Ray reserves for each learner actor")
    placement_strategy: Literal["STRICT_PACK", "PACK"] = Field(
        default="STRICT_PACK",
        description="Ray placement strategy of the ranks: STRICT_PACK puts them all on one node (rendezvous on "
        "loopback); PACK on as few nodes as hold them, for a group larger than a node (rendezvous on rank 0's node IP)",
    )

    global_batch_samples: int = Field(default=16, ge=1, description="trajectories per optimiser step, all ranks together")
    micro_batch_samples: int = Field(default=4, ge=1, description="trajectories per forward/backward on one rank")

    lr: float = Field(default=1e-6, gt=0.0, le=1.0, description="peak learning rate of AdamW")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1)")
    adam_eps: float = Field(default=1e-8, gt=0.0, le=1e-2, description="AdamW epsilon")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay")
    warmup_steps: int = Field(default=0, ge=0, description="optimiser steps of linear warm-up from lr/warmup to lr")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        default="constant",
        description="lr after warm-up: constant, or a decay that reaches min_lr_ratio*lr at the last update (step "
        "max_steps - 1)")
    max_steps: int = Field(default=1000, ge=1, description="optimiser steps of the run (end of the decay)")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0,
                                description="lr of the last update under cosine/linear, as a fraction of lr")
    grad_clip: float = Field(default=1.0, ge=0.0, description="max global gradient L2 norm; 0 disables clipping")

    eps_low: float = Field(default=0.2, ge=0.0, lt=1.0, description="lower clip: ratio >= 1 - eps_low")
    eps_high: float = Field(default=0.28, ge=0.0, le=10.0, description="upper clip (clip-higher): ratio <= 1 + eps_high")
    kl_coef: float = Field(default=0.0, ge=0.0, description="weight of k3 KL to the initial model; 0 = no reference model")
    aggregation: Literal["token", "sequence"] = Field(
        default="token", description="token: sum over the global batch's tokens / their count; sequence: mean of means")
    advantage_scale: Literal["group", "batch", "none"] = Field(
        default="group", description="divide centred rewards by the group std, the batch std, or nothing")
    advantage_eps: float = Field(default=1e-4, gt=0.0, description="added to the std before dividing")
    temperature: float = Field(
        default=1.0, gt=0.0, le=4.0,
        description="the rollout's sampling temperature: RL scores tokens under log_softmax(logits / temperature), "
        "the distribution the engine sampled from and reports behaviour log-probs of (SFT ignores it)",
    )
    old_logprobs: Literal["behaviour", "recompute"] = Field(
        default="behaviour",
        description="behaviour: the rollout engine's log-probs; recompute: a no-grad pass of the current policy "
        "before the update (removes engine/learner numeric mismatch from the ratio)",
    )
    behaviour_weight_cap: float | None = Field(
        default=None, ge=1.0, le=100.0,
        description="recompute only: weight each token's loss by min(π_recomputed / π_behaviour, cap), decoupled PPO's "
        "correction for groups sampled by older weights (async) or by an engine that differs (top_p); null: none, "
        "every group is trained on as if the current policy had sampled it")

    bf16: Literal["auto"] | bool = Field(default="auto", description="bfloat16 weights and compute; auto: on for CUDA, off on CPU")
    freeze_vision: bool = Field(default=False, description="keep the vision tower's weights fixed")
    vision_lr_scale: float = Field(
        default=1.0, gt=0.0, le=1.0,
        description="the vision tower's lr as a fraction of lr (its own AdamW group; schedule alike): a warm-"
        "started tower can then move slowly while the language model learns to read it")
    lora: LoraSpec | None = Field(default=None, description="train low-rank adapters instead of all weights")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in backward to save memory")
    encode_images_once_per_group: bool = Field(
        default=True, description="run the vision tower once per unique image, not once per sample")
    log_entropy: bool = Field(default=False, description="also report the policy's token entropy (one more softmax pass)")
    seed: int = Field(default=0, ge=0, description="seed of python, numpy and torch RNGs on every rank")
    cpu_cores: CpuLists | None = Field(
        default=None,
        description="CPU training: logical CPU ids each rank is pinned to, with as many torch threads, e.g. '1' or "
        "'0-3|4-7' (one list per rank, '|' between; one list for all ranks); None: no pinning. Keeps the "
        "learner off the cores rollout engines are bound to (EngineConfig.cpu_cores) when both share a node",
    )

    def rank_cpu_cores(self, rank: int) -> list[int] | None:
        """The logical CPU ids ``rank`` is pinned to (``cpu_cores``), or None."""
        if self.cpu_cores is None:
            return None
        lists = self.cpu_cores.split("|")
        return parse_cpu_list(lists[rank] if len(lists) > 1 else lists[0])

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        per_step = self.world_size * self.micro_batch_samples
        if self.global_batch_samples % per_step:
            raise ValueError(
                f"global_batch_samples ({self.global_batch_samples}) must be divisible by "
                f"world_size × micro_batch_samples ({self.world_size} × {self.micro_batch_samples} = {per_step})")
        if self.behaviour_weight_cap is not None and self.old_logprobs != "recompute":
            raise ValueError(f"behaviour_weight_cap ({self.behaviour_weight_cap}) needs old_logprobs: recompute (with "
                             "the behaviour log-probs as old ones the ratio itself corrects for the sampling weights)")
        if self.eps_high < self.eps_low:
            raise ValueError(f"eps_high ({self.eps_high}) must be >= eps_low ({self.eps_low}) (clip-higher)")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps})")
        if self.schedule != "constant" and self.warmup_steps > self.max_steps - 2:
            # The decay reaches min_lr_ratio at the last update (step max_steps - 1); with no update after the
            # warm-up's last, that update ran at the peak lr instead.
            raise ValueError(f"warmup_steps ({self.warmup_steps}) leaves the {self.schedule} schedule no update to decay "
                             f"over: it needs warmup_steps <= max_steps - 2 ({self.max_steps - 2})")
        if self.backend == "torch" and self.world_size != 1:
            raise ValueError(f"backend 'torch' runs one process; world_size must be 1, got {self.world_size}")
        if self.cpu_cores is not None and (lists := self.cpu_cores.count("|") + 1) not in (1, self.world_size):
            raise ValueError(f"cpu_cores: {lists} lists for {self.world_size} ranks (give one, or one per rank)")
        if self.device == "cpu" and self.bf16 is True:
            raise ValueError("bf16: true needs device cuda (or auto on a GPU machine); CPU training runs in float32")
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches each rank accumulates per optimiser step."""
        return self.global_batch_samples // (self.world_size * self.micro_batch_samples)

    @property
    def samples_per_rank(self) -> int:
        """Trajectories of the global batch that each rank trains on."""
        return self.global_batch_samples // self.world_size
