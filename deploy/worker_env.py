"""The environment every Refocus actor process gets (rollout, reward and learner workers)."""

from __future__ import annotations

import os

# Passed on from the driver when set: caches and the CPU accelerator choice must be the same in every process.
INHERITED = ("HF_HOME", "HF_HUB_OFFLINE", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR",
             "DS_ACCELERATOR", "TMPDIR")


def actor_env() -> dict[str, str]:
    """vLLM in-process (fast start, no __main__ guard needed), no Hugging Face progress bars (each checkpoint and
    SFT snapshot a learner wrote printed a "Writing model shards" bar into the driver's console, across the job's
    own progress bar), plus the inherited variables that are set."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    env.update({var: os.environ[var] for var in INHERITED if var in os.environ})
    return env
