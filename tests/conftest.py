"""Shared test setup: hardware/package-aware skipping and the session-scoped tiny model."""

from __future__ import annotations

import importlib.util
import os

import pytest

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


# DeepSpeed picks its accelerator at import time; on machines without CUDA it must be told. Where torch
# sees a GPU it is left to DeepSpeed's detection (cuda), so the tests marked gpu run on its CUDA path.
if not _has_cuda():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Caches and temp files stay inside the checkout (CI rule); nothing is ever fetched from a hub.
for _var, _sub in (
    ("HF_HOME", ".cache/huggingface"),
    ("VLLM_CACHE_ROOT", ".cache/vllm"),
    ("TORCH_EXTENSIONS_DIR", ".cache/torch_extensions"),
    ("TRITON_CACHE_DIR", ".cache/triton"),
):
    os.environ.setdefault(_var, str(REPO / _sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TMPDIR", str(REPO / ".tmp" / "ray"))


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU visible")
    skip_vllm = pytest.mark.skip(reason="vLLM is not installed")
    has_cuda, has_vllm = _has_cuda(), _has_vllm()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Qwen2.5-VL, built once per test session (random weights, local tokenizer)."""
    from models.build import build_model

    return build_model(size="tiny", out_dir=tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small synthetic data set (60 images, seed 0) that end-to-end runs read; never written to."""
    from data.synth import synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(out_dir=out, seed=0, n=60)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for tests of the driver's parts (learner group, rollout fleet, reward pool); a Ray
    already running is used and left running."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
