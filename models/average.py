"""Weight averaging: one model directory whose weights are the uniform mean of several checkpoints of one run.

Consecutive checkpoints of a run at a constant lr scatter around where the run is heading (issue #9: SFT checkpoints
45 steps apart differ by 0.04 held-out hard mIoU). Their average (as in stochastic weight averaging or "latest weight
averaging") is one settled model to evaluate instead of whichever checkpoint the run happened to stop on.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from learner.checkpoint import RESUMABLE_STATE
from models.records import AVERAGED_FROM_FILE, PROVENANCE_FILES

WEIGHTS_FILE = "model.safetensors"


def average_checkpoints(model_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write the uniform average of ``model_dirs``' weights (float tensors, summed in float64) to ``out_dir``, with the
    last directory's config, tokenizer and processor files; returns ``out_dir``. Every directory must hold one
    ``model.safetensors`` with the same tensor names, shapes and dtypes; non-float tensors must be equal in all."""
    import torch
    from safetensors.torch import load_file, save_file

    dirs = [Path(d) for d in model_dirs]
    if not dirs:
        raise ValueError("average_checkpoints: no model directories given")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i, directory in enumerate(dirs):
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing (sharded weights are not supported)")
        weights = load_file(path)
        if i == 0:
            dtypes = {name: t.dtype for name, t in weights.items()}
            total = {name: t.double() if t.is_floating_point() else t for name, t in weights.items()}
            continue
        if weights.keys() != total.keys():
            raise ValueError(f"{path}: its tensor names differ from {dirs[0] / WEIGHTS_FILE}'s")
        for name, tensor in weights.items():
            if tensor.shape != total[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, {tuple(total[name].shape)} before")
            if tensor.dtype != dtypes[name]:  # an int among floats would be compared, not summed
                raise ValueError(f"{path}: {name} is {tensor.dtype}, {dtypes[name]} before")
            if tensor.is_floating_point():
                total[name] += tensor.double()
            elif not torch.equal(tensor, total[name]):
                raise ValueError(f"{path}: non-float tensor {name} differs from the first directory's")
    averaged = {name: (t / len(dirs)).to(dtypes[name]) if t.is_floating_point() else t for name, t in total.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The record is written last: an average it lists is complete. One left from an earlier average here goes first.
    (out / AVERAGED_FROM_FILE).unlink(missing_ok=True)
    for item in dirs[-1].iterdir():
        if item.is_file() and item.name not in (WEIGHTS_FILE, *RESUMABLE_STATE, *PROVENANCE_FILES):
            shutil.copy2(item, out / item.name)
    save_file({name: t.contiguous() for name, t in averaged.items()}, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / AVERAGED_FROM_FILE).write_text(json.dumps([str(d) for d in dirs], indent=2))
    return out
