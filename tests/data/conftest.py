"""Shared fixtures of the data tests: one small synthetic set, generated once per session."""

from __future__ import annotations

import pytest

from data.synth import synthesize


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory):
    """120 images at the default knobs: 96 train, 12 test_easy, 12 test_hard."""
    out = tmp_path_factory.mktemp("synth")
    return synthesize(out_dir=out, seed=11, n=120)
