"""The learner on CUDA: device and bf16 resolution, one DeepSpeed ZeRO-3 rank in this process (NCCL),
GRPO and SFT steps in bf16, and agreement in float32 with the plain-torch learner on the CPU.

One process holds one torch.distributed group, and on a GPU machine it is NCCL: every DeepSpeed learner
here is on CUDA. The plain-torch backend needs no group, so it serves as the CPU reference.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from learner.backend import resolve_device, uses_bf16  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.export import assemble_state_dict  # noqa: E402
from learner.forward import sequence_logprobs  # noqa: E402
from learner.learner import GRAD_NORM, LR, STEP, TOKENS, Learner  # noqa: E402
from learner.loss import LOSS_TOTAL, SFT_NLL  # noqa: E402

LR_VALUE = 1e-3
# bf16 against float32 log-probs of the tiny model: measured on CPU bf16 max 0.004 and mean 0.0014 per
# token, while the log-probs themselves spread with a std of 0.24; a broken forward moves them by that much.
BF16_LOGPROB_MAX_ERROR = 0.05
BF16_LOGPROB_MEAN_ERROR = 0.01


def config(model_dir: str, **overrides) -> LearnerConfig:
    """A ZeRO-3 rank on CUDA in bf16, 4 micro-batches of 2 per step, constant lr, no clipping."""
    base = dict(model_path=model_dir, device="cuda", bf16=True, global_batch_samples=8, micro_batch_samples=2,
                lr=LR_VALUE, adam_eps=1e-6, grad_clip=0.0)
    return LearnerConfig(**{**base, **overrides})


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    """The full policy weights as CPU tensors in the learner's dtype (gathered from the ZeRO-3 partitions)."""
    return assemble_state_dict(learner.export_weights())[1]


def cpu_float32_logprobs(model_dir: str, batch) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return sequence_logprobs(model, batch)[0]


def test_device_and_bf16_resolution_on_a_cuda_machine(model_dir):
    """"auto" picks the GPU and bf16 there; explicit cuda works at any local rank of a one-GPU node; bf16
    on a CPU device is refused by the config and by the backend check alike."""
    auto = LearnerConfig(model_path=model_dir)
    device = resolve_device(auto)
    assert device == torch.device("cuda", 0)
    assert uses_bf16(auto, device) is True
    assert uses_bf16(auto, torch.device("cpu")) is False
    explicit = LearnerConfig(model_path=model_dir, device="cuda", bf16=False)
    assert resolve_device(explicit, local_rank=torch.cuda.device_count()) == torch.device("cuda", 0)
    assert uses_bf16(explicit, device) is False
    assert uses_bf16(config(model_dir), device) is True
    with pytest.raises(ValueError, match="needs a CUDA device"):
        uses_bf16(config(model_dir), torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16"):
        LearnerConfig(model_path=model_dir, device="cpu", bf16=True)


def test_zero3_bf16_rank_lives_on_cuda_and_scores_like_float32_on_cpu(model_dir, batches):
    """The rank joins an NCCL group, its ZeRO-3 partitions are bf16 tensors on the GPU, and its no-grad
    log-probs of a batch agree with a plain float32 model on the CPU within bf16 rounding."""
    import torch.distributed as dist

    learner = Learner(config(model_dir))
    assert learner.device == torch.device("cuda", 0) and learner.backend.bf16
    assert dist.get_backend() == "nccl"
    params = list(learner.model.parameters())
    assert params and all(hasattr(p, "ds_tensor") for p in params), "ZeRO-3 did not partition the model"
    assert {p.ds_tensor.device.type for p in params} == {"cuda"}
    assert {p.ds_tensor.dtype for p in params} == {torch.bfloat16}

    batch = batches[0]
    mask = batch.completion_mask.bool()
    got = learner.logprobs(batch)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    error = (got - cpu_float32_logprobs(model_dir, batch))[mask].abs()
    assert error.max().item() < BF16_LOGPROB_MAX_ERROR and error.mean().item() < BF16_LOGPROB_MEAN_ERROR, error


def test_default_forward_reaches_the_vision_tower_on_cuda(model_dir, batches, ieee_float32):
    """``sequence_logprobs``'s default path (images encoded once per group) scores like the per-sample
    reference path and back-propagates into every vision weight, on whatever transformers this machine has
    (5.17 ignores ``mm_encoder_outputs``: the default path must then fall back, not run without images)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to("cuda").train()
    batch = batches[0].to("cuda")
    mask = batch.completion_mask
    once, _ = sequence_logprobs(model, batch)
    with torch.no_grad():
        per_sample, _ = sequence_logprobs(model, batch, encode_images_once_per_group=False)
    torch.testing.assert_close(once * mask, per_sample * mask, atol=1e-5, rtol=1e-5)
    (once * mask).sum().backward()
    vision = {name: p.grad for name, p in model.named_parameters() if ".visual." in f".{name}"}
    assert vision and all(g is not None and bool(g.abs().sum() > 0) for g in vision.values()), \
        [name for name, g in vision.items() if g is None or not bool(g.abs().sum() > 0)]


def test_zero3_bf16_grpo_and_sft_steps_on_cuda(model_dir, batches):
    """A GRPO step gives a finite loss and gradient and moves the weights by one Adam step: on its first
    step AdamW moves each fp32 master by at most lr, so each bf16 weight moves by at most lr plus the bf16
    rounding of the master (half an ulp, <= 2^-8 of its magnitude), and most weights do move. SFT steps on
    the same rank follow: finite, counted, and the NLL of the repeated batch falls."""
    learner = Learner(config(model_dir))
    before = weights(learner)
    batch = batches[0]
    stats = learner.step(batch)
    assert math.isfinite(stats[LOSS_TOTAL])
    assert math.isfinite(stats[GRAD_NORM]) and stats[GRAD_NORM] > 0
    assert stats[LR] == LR_VALUE and stats[STEP] == 1 and stats[TOKENS] == batch.num_loss_tokens

    after = weights(learner)
    assert set(after) == set(before)
    moved = {"vision": 0, "language": 0}
    total = dict.fromkeys(moved, 0)
    for name, old in before.items():
        new = after[name]
        assert new.dtype == torch.bfloat16 and bool(torch.isfinite(new).all()), name
        old32, new32 = old.float(), new.float()
        bound = LR_VALUE * (1 + 1e-3) + 2**-8 * (old32.abs() + LR_VALUE)
        assert bool(((new32 - old32).abs() <= bound).all()), f"{name}: moved by more than one Adam step"
        part = "vision" if ".visual." in f".{name}" else "language"
        moved[part] += int((new != old).sum())
        total[part] += old.numel()
    # Predicted from float32 CPU gradients: 99.7 % of either part's bf16 weights change (the rest are norm
    # weights at 1.0, whose half ulp exceeds lr). A part that stays put got no gradient.
    for part in moved:
        assert moved[part] > 0.9 * total[part], f"{part}: only {moved[part]} of {total[part]} weights changed"

    first = learner.sft_step(batch)
    assert math.isfinite(first[SFT_NLL]) and math.isfinite(first[GRAD_NORM]) and first[GRAD_NORM] > 0
    assert first[STEP] == 2 and first[TOKENS] == batch.num_loss_tokens
    assert any(not torch.equal(value, after[name]) for name, value in weights(learner).items())
    later = [learner.sft_step(batch)[SFT_NLL] for _ in range(3)]
    assert all(math.isfinite(nll) for nll in later)
    assert later[-1] < first[SFT_NLL], (first[SFT_NLL], later)
    assert learner.version == 5


def test_zero3_float32_on_cuda_matches_plain_torch_on_cpu(model_dir, batches, ieee_float32):
    """Without bf16 (and without TF32) the CUDA ZeRO-3 rank computes the plain CPU learner's update: the
    NCCL all-reduces, the loss scaling and the accumulation over 4 micro-batches hold on the GPU path too.
    GRPO then SFT: same loss, gradient norm and updated weights within float32 reduction-order noise."""
    cuda = Learner(config(model_dir, bf16=False))
    cpu = Learner(config(model_dir, bf16=False, backend="torch", device="cpu"))
    assert cuda.device.type == "cuda" and not cuda.backend.bf16 and cpu.device.type == "cpu"
    batch = batches[1]

    got, expected = cuda.step(batch), cpu.step(batch)
    assert got[TOKENS] == expected[TOKENS]
    assert got[LOSS_TOTAL] == pytest.approx(expected[LOSS_TOTAL], rel=1e-5, abs=1e-6)
    assert got[GRAD_NORM] == pytest.approx(expected[GRAD_NORM], rel=1e-4)
    cuda_weights, cpu_weights = weights(cuda), cpu.model.state_dict()
    for name, value in cuda_weights.items():
        assert value.dtype == torch.float32, name
        # Adam's first step is about lr per weight: 1e-5 is 1 % of it.
        torch.testing.assert_close(value, cpu_weights[name].detach(), atol=1e-5, rtol=0, msg=name)

    got, expected = cuda.sft_step(batch), cpu.sft_step(batch)
    assert got[SFT_NLL] == pytest.approx(expected[SFT_NLL], rel=1e-5)
    assert got[GRAD_NORM] == pytest.approx(expected[GRAD_NORM], rel=1e-4)
