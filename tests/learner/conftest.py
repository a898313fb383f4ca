"""Fixtures shared by the learner tests."""

import pytest


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> str:
    """The tiny checkpoint directory as a string (LearnerConfig.model_path); DeepSpeed's environment
    (DS_ACCELERATOR=cpu, TORCH_EXTENSIONS_DIR in the checkout) is set by tests/conftest.py."""
    return str(tiny_model_dir)
