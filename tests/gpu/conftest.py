"""Fixtures of the CUDA tests: the tiny model's directory and small GRPO batches, built on the CPU.

Every test here is marked ``gpu`` and skipped where torch sees no CUDA device (tests/conftest.py), so
these fixtures only run on a GPU machine. On one, tests/conftest.py leaves ``DS_ACCELERATOR`` unset and
DeepSpeed detects its cuda accelerator (NCCL).
"""

from __future__ import annotations

import io

import pytest

# Two groups of four samples; completions of different lengths so that padding and masks matter.
COMPLETION_LENGTHS = [[3, 6, 9, 12], [5, 7, 8, 11]]
ADVANTAGES = [[1.0, -0.5, 0.25, -0.75], [-1.2, 0.4, 0.9, -0.1]]
IMAGE_PX = 56  # 2 x 2 merged 28-px cells: 4 image pad tokens per prompt
BEHAVIOUR_NOISE = 0.3  # behaviour log-probs = initial policy's + this much noise: some ratios leave the clip range


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _groups(model_dir: str, *, seed: int) -> list:
    import numpy as np
    from transformers import AutoConfig

    from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup

    config = AutoConfig.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    groups = []
    for g, lengths in enumerate(COMPLETION_LENGTHS):
        prompt = ([config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]
                  + rng.integers(20, 500, 5).tolist())
        trajectories = [Trajectory(sample_index=i, prompt_ids=prompt, completion_ids=rng.integers(20, 500, n).tolist(),
                                   behaviour_logprobs=[0.0] * n, loss_mask=[1] * n, completion_text="",
                                   reward=float(rng.random()))
                        for i, n in enumerate(lengths)]
        groups.append(TrajectoryGroup(
            prompt=PromptGroup(group_id=f"s{seed}g{g}", prompt_id=f"g{g}", task="camo", difficulty="easy",
                               question="?", image=_png(10 * seed + g),
                               target=Target(False, None, [], IMAGE_PX, IMAGE_PX), stage=1),
            trajectories=trajectories, policy_version=0))
    return groups


def _batch(model_dir: str, *, seed: int):
    """A collated CPU batch whose behaviour log-probs are the float32 initial model's plus noise."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from learner.batch import collate
    from learner.forward import sequence_logprobs

    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    batch = collate(_groups(model_dir, seed=seed), image_processor=processor, pad_token_id=0, advantages=ADVANTAGES)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(model, batch)
    noise = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(seed + 1))
    batch.old_logprobs = (logprobs + BEHAVIOUR_NOISE * noise) * batch.completion_mask
    return batch


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> str:
    """The tiny checkpoint directory as a string (LearnerConfig.model_path)."""
    return str(tiny_model_dir)


@pytest.fixture(scope="session")
def batches(model_dir) -> list:
    """Three different CPU batches of 8 samples (seeds 0, 1, 2); the learner moves them to its device."""
    return [_batch(model_dir, seed=seed) for seed in range(3)]


@pytest.fixture
def ieee_float32():
    """Full float32 matmuls and convolutions on CUDA (no TF32) while a test runs, for CPU comparisons."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
