"""Rollout engines: one contract (base.py), two backends imported only when chosen."""

from __future__ import annotations

from actors.config import EngineConfig
from actors.engines.base import EngineRequest, EngineSample, RolloutEngine

__all__ = ["EngineRequest", "EngineSample", "RolloutEngine", "build_engine"]


def build_engine(config: EngineConfig, *, model_path: str) -> RolloutEngine:
    """The engine ``config.backend`` names on the checkpoint at ``model_path``; its backend
    (transformers or vLLM) is imported here, lazily."""
    if config.backend == "hf":
        from actors.engines.hf import HFEngine

        return HFEngine(config, model_path=model_path)
    if config.backend == "vllm":
        from actors.engines.vllm import VLLMEngine

        return VLLMEngine(config, model_path=model_path)
    raise ValueError(f"engine.backend: unknown {config.backend!r}")
