"""Rollout engines: one contract (base.py), two backends imported only when chosen."""

from __future__ import annotations

from actors.config import EngineConfig
from actors.engines.base import EngineRequest, EngineSample, RolloutEngine

__all__ = ["EngineRequest", "EngineSample", "RolloutEngine", "build_engine"]


def build_engine(config: EngineConfig) -> RolloutEngine:
    """The engine ``config.backend`` names; its backend (transformers or vLLM) is imported here, lazily."""
    if config.backend == "hf":
        from actors.engines.hf import HFEngine

        return HFEngine(config)
    if config.backend == "vllm":
        from actors.engines.vllm import VLLMEngine

        return VLLMEngine(config)
    raise ValueError(f"engine.backend: unknown {config.backend!r}")
