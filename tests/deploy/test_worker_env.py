"""The environment every actor process gets (``deploy.worker_env.actor_env``)."""

import os
import subprocess
import sys

from deploy.worker_env import actor_env


def _progress_bars_enabled(env: dict[str, str]) -> bool:
    """What transformers decides in a fresh process with ``env`` on top of this one's."""
    code = "from transformers.utils import logging; print(logging.is_progress_bar_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout
    return out.strip() == "True"


def test_actors_write_no_hugging_face_progress_bars_unless_the_user_wants_them(monkeypatch):
    """A learner's checkpoint or SFT snapshot printed a "Writing model shards" bar through Ray into the driver's
    console, across the SFT progress bar; a user who sets the variable keeps their choice."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert _progress_bars_enabled({})  # transformers' default: bars on
    assert not _progress_bars_enabled(actor_env())
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    assert _progress_bars_enabled(actor_env())


def test_actors_inherit_caches_and_run_vllm_in_process(monkeypatch):
    monkeypatch.setenv("HF_HOME", "/refocus-test/hf-home")
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # a vLLM engine built here sets it
    env = actor_env()
    assert env["HF_HOME"] == "/refocus-test/hf-home" and "VLLM_CACHE_ROOT" not in env
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
