"""Checkpoint directories: written atomically, found again by ``latest_complete``.

Layout of ``<root>/step_<N>/`` (N = optimiser steps done)::

    config.json, model*.safetensors, tokenizer / processor / chat-template files
                                   a Hugging Face model directory (transformers Auto classes, vLLM)
    state/                         backend state: DeepSpeed per-rank optimiser partitions + fp32
                                   masters + lr scheduler (or the torch backend's pickles)
    rng/rank_<r>.pt                python, numpy and torch RNG states of every rank
    trainer_state.json             {"step": N, "world_size": W, "extra_state": {...}}
    COMPLETE                       written last: a directory without it is not a checkpoint

Atomicity: everything is written into ``step_<N>.tmp``, files are fsynced, the directory is renamed
to ``step_<N>`` and the ``COMPLETE`` marker is written last. A crash at any point leaves either no
``step_<N>`` or one without ``COMPLETE``; ``latest_complete`` skips both. All ranks must see the same
filesystem (one node, or a shared volume).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS_DIR = "checkpoints"  # <run output dir>/checkpoints/step_N, for RL and SFT runs alike
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.json"
STATE_DIR = "state"
RNG_DIR = "rng"
# What a checkpoint adds to the model directory it also is: its resumable state. A plain model written from one (an
# export, a weight average) carries none of it, or it would pass for a resumable checkpoint of the run.
RESUMABLE_STATE = (COMPLETE_MARKER, TRAINER_STATE_FILE, STATE_DIR, RNG_DIR)
TMP_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def tmp_dir(root: str | Path, step: int) -> Path:
    return Path(root) / (step_dir_name(step) + TMP_SUFFIX)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under ``root``, by step (partial ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None (partial ones skipped)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def refuse_earlier_run(out: str | Path, *, setting: str) -> None:
    """Raise if the run directory ``out`` holds an earlier run's checkpoints: a fresh run there would write over
    its steps and leave its later ones, which a resume would then take for its own. ``setting`` names what chose
    ``out`` (a config field or a flag), for the message."""
    earlier = latest_complete(Path(out) / CHECKPOINTS_DIR)
    if earlier is not None:
        raise ValueError(f"{setting}: {out} holds an earlier run (checkpoint {earlier.name}); pass --resume to "
                         f"continue it, or set another {setting}")


def capture_rng() -> dict:
    """RNG states of python, numpy and torch (CPU, and CUDA where present) of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: str | Path, *, rank: int) -> None:
    path = Path(directory) / RNG_DIR
    path.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), path / f"rank_{rank}.pt")


def load_rng(directory: str | Path, *, rank: int) -> None:
    # weights_only=False: the numpy/python RNG states are tuples with arrays; the file is our own.
    restore_rng(torch.load(Path(directory) / RNG_DIR / f"rank_{rank}.pt", weights_only=False))


def trainer_state_json(*, step: int, world_size: int, extra_state: dict | None) -> str:
    """The step counter and the caller's JSON state (curriculum, data position, ...) as JSON text.

    Raises ValueError for state that JSON cannot hold faithfully (NaN/inf, non-str keys, objects). Tuples come
    back as lists.
    """
    payload = {"step": step, "world_size": world_size, "extra_state": extra_state or {}}
    _check_str_keys(payload["extra_state"], where="extra_state")  # json.dumps would turn 0 into "0" silently
    try:
        return json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"extra_state must be JSON-serialisable (finite numbers, str keys): {error}") from error


def _check_str_keys(value, *, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"extra_state must be JSON-serialisable (finite numbers, str keys): {where} has the "
                                 f"key {key!r} ({type(key).__name__}), which a resume would read back as a string")
            _check_str_keys(item, where=f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_str_keys(item, where=f"{where}[{index}]")


def write_trainer_state(directory: str | Path, *, step: int, world_size: int, extra_state: dict | None) -> None:
    (Path(directory) / TRAINER_STATE_FILE).write_text(
        trainer_state_json(step=step, world_size=world_size, extra_state=extra_state))


def read_trainer_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / TRAINER_STATE_FILE).read_text())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and directory below ``directory`` (and itself), so a rename publishes data."""
    directory = Path(directory)
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def publish(tmp: str | Path, final: str | Path) -> Path:
    """fsync ``tmp``, rename it to ``final``, then write and fsync the COMPLETE marker (rank 0 only)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    fsync_tree(tmp)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    marker = final / COMPLETE_MARKER
    with open(marker, "w") as handle:
        handle.write("ok\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(final)
    return final
