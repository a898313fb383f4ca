"""Checkpoints of a CUDA learner: the bf16 ZeRO-3 state, the schedule and the CUDA RNG survive a reload.

The CPU suite (tests/learner/test_checkpoint.py) proves bit-exact resume on gloo; here the state lives on
the GPU (bf16 partitions, fp32 masters, optimiser moments) and ``learner.checkpoint`` must also carry the
CUDA generator's state, which it only captures where torch sees a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from learner import checkpoint as ckpt  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.export import assemble_state_dict  # noqa: E402
from learner.learner import GRAD_NORM, LR, STEP, TOKENS, Learner  # noqa: E402
from learner.loss import LOSS_TOTAL  # noqa: E402

EXTRA_STATE = {"curriculum": {"stage": 2}, "data_position": 17}
LR_VALUE = 1e-3


def config(model_dir: str) -> LearnerConfig:
    # A schedule that changes the lr every step and weight decay: both must resume, not restart.
    return LearnerConfig(model_path=model_dir, device="cuda", bf16=True, global_batch_samples=8, micro_batch_samples=2,
                         lr=LR_VALUE, weight_decay=0.1, grad_clip=0.5, schedule="cosine", warmup_steps=0, max_steps=4)


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return assemble_state_dict(learner.export_weights())[1]


def test_checkpoint_on_cuda_restores_weights_schedule_and_cuda_rng(model_dir, batches, tmp_path):
    """Save after one bf16 step on the GPU, then load into a fresh learner whose RNGs were moved elsewhere:
    the weights are bit-identical to the saved ones, the CUDA and CPU generators continue exactly where the
    saved run's did, and the next step uses the resumed (not restarted) lr and reproduces the uninterrupted
    run's loss and update. The update is compared within one bf16 ulp: CUDA backward kernels (flash
    attention's dq among them) accumulate with atomics, so two runs may round a weight differently."""
    first = Learner(config(model_dir))
    first.step(batches[0])
    path = first.save_checkpoint(tmp_path, extra_state=EXTRA_STATE)
    saved = weights(first)
    rng = torch.load(Path(path) / ckpt.RNG_DIR / "rank_0.pt", weights_only=False)
    assert "cuda" in rng and len(rng["cuda"]) == torch.cuda.device_count()
    cuda_draw, cpu_draw = torch.rand(8, device="cuda"), torch.rand(8)  # the draws right after the save
    expected = first.step(batches[1])
    expected_weights = weights(first)

    second = Learner(config(model_dir))
    torch.manual_seed(12345)  # seeds the CUDA generator too: both now differ from the checkpoint's
    assert not torch.equal(torch.rand(8, device="cuda"), cuda_draw)
    assert second.load_checkpoint(path) == EXTRA_STATE and second.version == 1
    assert torch.equal(torch.rand(8, device="cuda"), cuda_draw)
    assert torch.equal(torch.rand(8), cpu_draw)
    restored = weights(second)
    assert set(restored) == set(saved)
    for name, value in saved.items():
        assert restored[name].dtype == torch.bfloat16 and torch.equal(restored[name], value), name

    got = second.step(batches[1])
    # Step index 1 of a 4-step cosine (progress 1/3: index 3, the last, runs at the floor): lr (1 + cos(pi/3)) / 2;
    # a restarted schedule would use lr itself.
    assert got[LR] == expected[LR] == pytest.approx(LR_VALUE * 0.5 * (1 + math.cos(math.pi / 3)))
    assert got[STEP] == expected[STEP] == 2 and got[TOKENS] == expected[TOKENS]
    assert got[LOSS_TOTAL] == pytest.approx(expected[LOSS_TOTAL], rel=1e-5, abs=1e-6)
    assert got[GRAD_NORM] == pytest.approx(expected[GRAD_NORM], rel=1e-3)
    for name, value in weights(second).items():
        torch.testing.assert_close(value.float(), expected_weights[name].float(), rtol=2**-7, atol=1e-5, msg=name)
