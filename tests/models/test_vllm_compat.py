"""The torchvision shim for vLLM: what it maps, and that it stays out of the way where not needed."""

import importlib
import os
import subprocess
import sys

import pytest

from models import vllm_compat


def test_alias_serves_smart_resize_from_the_pil_module():
    if not vllm_compat.install_import_alias():
        pytest.skip("torchvision works here: the shim is a no-op (checked below)")
    module = importlib.import_module(vllm_compat.TORCHVISION_MODULE)
    pil = importlib.import_module(vllm_compat.PIL_MODULE)
    assert module is pil
    assert module.smart_resize(112, 112, factor=28, min_pixels=56 * 56, max_pixels=224 * 224) == (112, 112)
    assert module.Qwen2VLImageProcessor is pil.Qwen2VLImageProcessorPil


def test_child_processes_get_the_alias_through_the_environment():
    """vLLM inspects model classes in a subprocess; only the environment reaches it."""
    if vllm_compat._torchvision_works():
        pytest.skip("torchvision works here: nothing to alias")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(vllm_compat.SITE_DIR), env.get("PYTHONPATH", "")])
    code = f"import {vllm_compat.TORCHVISION_MODULE} as m; print(m.smart_resize(224, 112, factor=28))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(224, 112)")


def test_without_the_alias_the_import_really_fails():
    """Guards the shim's reason to exist: if this starts passing, the shim can be deleted."""
    if vllm_compat._torchvision_works():
        pytest.skip("torchvision works here")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import {vllm_compat.TORCHVISION_MODULE}"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "torchvision" in out.stderr


def test_install_is_a_no_op_where_torchvision_works(monkeypatch):
    monkeypatch.setattr(vllm_compat, "_torchvision_works", lambda: True)
    before = list(sys.meta_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert vllm_compat.install() is False
    assert sys.meta_path == before
    assert "PYTHONPATH" not in os.environ
