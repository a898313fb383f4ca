"""Fixtures shared by the learner tests."""

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> str:
    """The tiny checkpoint directory as a string (LearnerConfig.model_path); DeepSpeed's environment
    (DS_ACCELERATOR=cpu, TORCH_EXTENSIONS_DIR in the checkout) is set by tests/conftest.py."""
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for LearnerGroup tests (a cluster already running is used and left running)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / "ray"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
