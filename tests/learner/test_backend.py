"""The learner's training step on the DeepSpeed ZeRO-3 backend (CPU, gloo) and the plain torch backend.

Model: the project's tiny Qwen2.5-VL (``models.build``, random weights, float32). Batch: 2 groups × 4
samples with completions of different lengths; behaviour log-probs are the initial policy's own plus
noise, so some ratios leave the clip range and the clip statistics are exercised.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup  # noqa: E402
from learner.backend import deepspeed_config, lr_factor  # noqa: E402
from learner.batch import LearnerBatch, collate  # noqa: E402
from learner.config import LearnerConfig, LoraSpec  # noqa: E402
from learner.export import assemble_state_dict  # noqa: E402
from learner.forward import sequence_logprobs  # noqa: E402
from learner.learner import GRAD_NORM, LR, SAMPLES, STEP, TOKENS, Learner  # noqa: E402
from learner.loss import (BEHAVIOUR_WEIGHT_CAPPED, BEHAVIOUR_WEIGHT_MEAN, CLIPFRAC_HIGH, CLIPFRAC_LOW,  # noqa: E402
                          ENTROPY, LOSS_KL_REF, LOSS_TOTAL, RATIO_MAX, RATIO_MEAN)

REPO = Path(__file__).resolve().parents[2]
EXTENSIONS_DIR = str(REPO / ".cache" / "torch_extensions")  # DeepSpeed's shm op: compiled once, reused
COMPLETION_LENGTHS = [[3, 6, 9, 12], [5, 7, 8, 11]]




def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_groups(model_dir: str, *, seed: int = 0) -> list[TrajectoryGroup]:
    """2 groups × 4 samples; a 56-px image is 2×2 merged cells = 4 image pads in the prompt."""
    from transformers import AutoConfig

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
            prompt=PromptGroup(group_id=f"g{g}#0", prompt_id=f"g{g}", task="camo", difficulty="easy", question="?",
                               image=_png(g), target=Target(False, None, [], 56, 56), stage=1),
            trajectories=trajectories, policy_version=0))
    return groups


def make_batch(model_dir: str, *, advantages, noise: float = 0.3) -> LearnerBatch:
    """Collated batch whose behaviour log-probs are the initial model's plus Gaussian noise."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    groups = make_groups(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    batch = collate(groups, image_processor=processor, pad_token_id=0, advantages=advantages)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(model, batch)
    generator = torch.Generator().manual_seed(1)
    behaviour = (logprobs + noise * torch.randn(logprobs.shape, generator=generator)) * batch.completion_mask
    batch.old_logprobs = behaviour
    return batch


ADVANTAGES = [[1.0, -0.5, 0.25, -0.75], [-1.2, 0.4, 0.9, -0.1]]


@pytest.fixture(scope="module")
def batch(model_dir) -> LearnerBatch:
    return make_batch(model_dir, advantages=ADVANTAGES)


def config(model_dir: str, **overrides) -> LearnerConfig:
    # adam_eps 1e-6: Adam's first step is ~lr·sign(g); a larger eps keeps float-rounding differences of
    # near-zero gradients (different reduction orders) from being amplified to ±lr.
    base = dict(model_path=model_dir, global_batch_samples=8, micro_batch_samples=2, lr=1e-4, adam_eps=1e-6,
                grad_clip=0.0)
    return LearnerConfig(**{**base, **overrides})


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    _, state = assemble_state_dict(learner.export_weights())
    return state


# ---------------------------------------------------------------- pure parts


def test_config_requires_whole_micro_batches_per_rank(model_dir):
    with pytest.raises(ValueError, match="global_batch_samples"):
        LearnerConfig(model_path=model_dir, world_size=2, global_batch_samples=12, micro_batch_samples=4)
    with pytest.raises(ValueError, match="eps_high"):
        LearnerConfig(model_path=model_dir, eps_low=0.3, eps_high=0.2)
    with pytest.raises(ValueError, match="world_size must be 1"):
        LearnerConfig(model_path=model_dir, backend="torch", world_size=2, global_batch_samples=8, micro_batch_samples=4)
    with pytest.raises(ValueError, match="learning_rate"):
        LearnerConfig(model_path=model_dir, learning_rate=1e-5)
    good = LearnerConfig(model_path=model_dir, world_size=2, global_batch_samples=16, micro_batch_samples=2)
    assert good.gradient_accumulation_steps == 4 and good.samples_per_rank == 8


def test_deepspeed_config_geometry(model_dir):
    cfg = LearnerConfig(model_path=model_dir, world_size=2, global_batch_samples=16, micro_batch_samples=2, grad_clip=0.5)
    ds = deepspeed_config(cfg, bf16=False)
    assert ds["train_batch_size"] == 16 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"]


@pytest.mark.parametrize(("step", "schedule", "expected"), [
    (0, "constant", 0.25),  # warm-up: (0 + 1) / 4
    (3, "constant", 1.0),  # last warm-up step reaches the peak
    (10, "constant", 1.0),
    (4, "linear", 1.0),  # decay starts after warm-up: p = 0
    (9, "linear", 0.55),  # p = (9 - 4) / (15 - 1 - 4) = 0.5 -> 1 - 0.9 * 0.5
    (14, "linear", 0.1),  # the last of 15 updates: p = 1 -> min_lr_ratio
    (9, "cosine", 0.55),  # 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    (14, "cosine", 0.1),  # the last update runs at the floor
    (20, "cosine", 0.1),  # past max_steps it stays at the floor
])
def test_lr_factor_hand_computed(step, schedule, expected):
    got = lr_factor(step, schedule=schedule, warmup_steps=4, max_steps=15, min_lr_ratio=0.1)
    assert got == pytest.approx(expected)


def test_lr_factor_cosine_quarter():
    # p = 25 / (101 - 1) = 0.25: 0.5 * (1 + cos(pi/4)) = 0.853553...
    assert lr_factor(25, schedule="cosine", warmup_steps=0, max_steps=101, min_lr_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4)))


# ---------------------------------------------------------------- one rank, in this process


@pytest.mark.parametrize("checkpointing", [False, True])
def test_deepspeed_zero3_accumulation_matches_plain_torch(model_dir, batch, checkpointing):
    """4 micro-batches under ZeRO-3 (with or without activation checkpointing) give the same update
    as the plain torch backend.

    Regression: calling the module directly (not through engine.forward) made each micro-batch's
    gradient replace the previous one; the grad norm was 1/3 of the true one.
    """
    reference = Learner(config(model_dir, backend="torch"))
    ref_stats = reference.step(batch)
    ref_weights = dict(reference.model.state_dict())
    zero3 = Learner(config(model_dir, gradient_checkpointing=checkpointing))
    stats = zero3.step(batch)
    assert stats[LOSS_TOTAL] == pytest.approx(ref_stats[LOSS_TOTAL], rel=1e-5)
    assert stats[GRAD_NORM] == pytest.approx(ref_stats[GRAD_NORM], rel=1e-4)
    got = weights(zero3)
    assert set(got) == set(ref_weights)
    for name, value in got.items():
        torch.testing.assert_close(value, ref_weights[name], atol=2e-6, rtol=0, msg=name)


def test_step_statistics(model_dir, batch):
    learner = Learner(config(model_dir, schedule="linear", warmup_steps=2, max_steps=10, log_entropy=True))
    first, second = learner.step(batch), learner.step(batch)
    assert 0 < first[ENTROPY] <= math.log(learner.model.config.text_config.vocab_size)
    assert LOSS_KL_REF not in first  # no reference model without kl_coef
    assert first[STEP] == 1 and second[STEP] == 2
    assert first[TOKENS] == batch.num_loss_tokens == sum(map(sum, COMPLETION_LENGTHS))
    assert first[SAMPLES] == 8
    assert first[LR] == pytest.approx(0.5e-4) and second[LR] == pytest.approx(1e-4)  # warm-up: 1/2, 2/2
    assert first[GRAD_NORM] > 0
    # Noise of 0.3 on the behaviour log-probs pushes some ratios beyond both clip edges.
    assert 0 < first[CLIPFRAC_LOW] < 1 and 0 < first[CLIPFRAC_HIGH] < 1


def test_every_trainable_parameter_moves_with_signal(model_dir, batch):
    learner = Learner(config(model_dir))
    before = weights(learner)
    learner.step(batch)
    after = weights(learner)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []


def test_zero_advantages_leave_weights_unchanged(model_dir):
    """All-zero advantages give zero gradients. With weight_decay 0 nothing moves; with weight decay,
    AdamW still shrinks each weight by exactly (1 - lr·wd) (its Adam term is 0/(0 + eps) = 0)."""
    flat = make_batch(model_dir, advantages=[[0.0] * 4, [0.0] * 4])
    plain = Learner(config(model_dir, weight_decay=0.0))
    before = weights(plain)
    stats = plain.step(flat)
    assert stats[GRAD_NORM] == 0.0
    after = weights(plain)
    assert all(torch.equal(before[name], after[name]) for name in before)

    decayed = Learner(config(model_dir, weight_decay=0.1, lr=1e-2))
    decayed.step(flat)
    shrunk = weights(decayed)
    for name, value in before.items():
        torch.testing.assert_close(shrunk[name], value * (1 - 1e-2 * 0.1), atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_vision_tower_has_its_own_scaled_lr(model_dir, backend):
    """Zero advantages: AdamW's Adam term is 0, so each weight only decays, by exactly (1 - lr·wd) of
    its group: lr·0.25 in the vision tower, lr elsewhere (hand-computed factors)."""
    flat = make_batch(model_dir, advantages=[[0.0] * 4, [0.0] * 4])
    learner = Learner(config(model_dir, backend=backend, weight_decay=0.1, lr=1e-2, vision_lr_scale=0.25))
    before = weights(learner)
    learner.step(flat)
    after = weights(learner)
    for name, value in before.items():
        factor = 1 - 0.25e-2 * 0.1 if name.startswith("model.visual.") else 1 - 1e-2 * 0.1
        torch.testing.assert_close(after[name], value * factor, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_the_reported_lr_is_the_tower_s_when_only_the_tower_trains(model_dir, batch, backend):
    """LoRA on the vision tower's qkv alone: the text group is empty. Torch reported its lr (1e-2), which no
    parameter used; DeepSpeed, which drops empty groups, the tower's."""
    learner = Learner(config(model_dir, backend=backend, lr=1e-2, vision_lr_scale=0.25, warmup_steps=0,
                             lora=LoraSpec(rank=4, alpha=8.0, targets=["qkv"])))
    assert learner.step(batch)[LR] == pytest.approx(0.25e-2)


def test_pinning_to_cpus_the_process_may_not_use_fails_clearly(model_dir):
    missing = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match=f"asks for CPUs \\[{missing}\\]"):
        Learner(config(model_dir, cpu_cores=str(missing)))


@pytest.mark.parametrize("zero_stage", [3, 2, 1, 0])
def test_kl_to_the_initial_policy(model_dir, batch, zero_stage):
    """The reference is the initial policy: KL is exactly 0 before the first update, > 0 after it. Under ZeRO
    stages 1 and 2 building the reference failed ("zero stage 1 requires an optimizer")."""
    learner = Learner(config(model_dir, kl_coef=0.1, lr=1e-3, zero_stage=zero_stage))
    first, second = learner.step(batch), learner.step(batch)
    assert first[LOSS_KL_REF] == 0.0
    assert second[LOSS_KL_REF] > 0.0


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_every_zero_stage_reports_the_grad_norm_plain_torch_does(model_dir, batch, zero_stage):
    """ZeRO-0 in float32 reported NaN: DeepSpeed clips those gradients without keeping their norm."""
    reference = Learner(config(model_dir, backend="torch")).step(batch)
    stats = Learner(config(model_dir, zero_stage=zero_stage)).step(batch)
    assert stats[GRAD_NORM] == pytest.approx(reference[GRAD_NORM], rel=1e-4)


def test_freeze_vision_keeps_the_tower_fixed(model_dir, batch):
    learner = Learner(config(model_dir, freeze_vision=True))
    before = weights(learner)
    learner.step(batch)
    after = weights(learner)
    vision = {name for name in before if name.startswith("model.visual.")}
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert all(not torch.equal(before[name], after[name]) for name in before if name not in vision)


def test_wrong_shard_size_is_rejected(model_dir, batch):
    learner = Learner(config(model_dir, backend="torch"))
    with pytest.raises(ValueError, match="rank 0: 4.*global_batch_samples / world_size = 8"):
        learner.step(batch.select(range(4)))


def test_rl_scores_tokens_at_the_sampling_temperature(model_dir, batch):
    """Behaviour log-probs of a run sampled at T = 0.7 are of log_softmax(logits / 0.7) (the engines'
    convention): a learner at that temperature starts from ratio 1; one at T = 1 would not."""
    from transformers import AutoModelForImageTextToText

    with torch.no_grad():
        tempered, _ = sequence_logprobs(AutoModelForImageTextToText.from_pretrained(model_dir), batch, temperature=0.7)
    mask = batch.completion_mask
    on_policy = replace(batch, old_logprobs=tempered * mask)
    stats = Learner(config(model_dir, temperature=0.7)).step(on_policy)
    assert stats[RATIO_MEAN] == pytest.approx(1.0, abs=1e-5) and stats[RATIO_MAX] == pytest.approx(1.0, abs=1e-4)
    assert stats[CLIPFRAC_LOW] == 0 and stats[CLIPFRAC_HIGH] == 0
    untempered = Learner(config(model_dir)).step(on_policy)
    assert abs(untempered[RATIO_MEAN] - 1.0) > 0.01


@pytest.mark.parametrize(("backend", "aggregation"), [("deepspeed", "token"), ("deepspeed", "sequence"),
                                                    ("torch", "sequence")])
def test_recompute_old_logprobs_starts_at_ratio_one(model_dir, batch, backend, aggregation):
    learner = Learner(config(model_dir, backend=backend, old_logprobs="recompute", aggregation=aggregation))
    # The learner scores like the plain model it was loaded from (a forward-only pass, as the recompute).
    from transformers import AutoModelForImageTextToText

    with torch.no_grad():
        plain, _ = sequence_logprobs(AutoModelForImageTextToText.from_pretrained(model_dir), batch)
    mask = batch.completion_mask
    torch.testing.assert_close(learner.logprobs(batch) * mask, plain * mask, atol=1e-5, rtol=1e-5)
    stats = learner.step(batch)
    assert stats[CLIPFRAC_LOW] == 0 and stats[CLIPFRAC_HIGH] == 0
    # Ratio 1 everywhere, so each token's loss is -A of its sequence. Over 4 micro-batches of 2 samples
    # the GLOBAL normaliser must give: token: -(sum_b A_b n_b) / sum_b n_b; sequence: -mean_b A_b.
    lengths, adv = np.array(COMPLETION_LENGTHS, dtype=float), np.array(ADVANTAGES)
    expected = -(adv * lengths).sum() / lengths.sum() if aggregation == "token" else -adv.mean()
    assert stats[LOSS_TOTAL] == pytest.approx(expected, rel=1e-6)


def test_the_torch_backend_in_bf16_computes_in_bf16_over_float32_weights(model_dir, batch, monkeypatch):
    """bf16 (auto on CUDA) loaded the torch backend's weights in bf16 and ran AdamW on them with no fp32 master:
    at the default lr 1e-6, 98 % of the weights never moved. Now the weights and moments stay float32 and every
    forward, the vision tower's included, runs under bf16 autocast (on the CPU here, the same code path)."""
    import learner.backend as backend

    monkeypatch.setattr(backend, "uses_bf16", lambda config, device: True)
    learner = Learner(config(model_dir, backend="torch", lr=1e-6))
    seen = {}
    linears = {"visual": next(m for n, m in learner.model.named_modules()
                              if ".visual." in f".{n}." and isinstance(m, torch.nn.Linear)),
               "lm_head": next(m for n, m in learner.model.named_modules() if n.endswith("lm_head"))}
    for name, module in linears.items():  # (a hook that returns a value replaces the module's output)
        module.register_forward_hook(lambda m, args, out, name=name: None if seen.setdefault(name, out.dtype) else None)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.step(batch)
    assert seen == {"visual": torch.bfloat16, "lm_head": torch.bfloat16}
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in learner.model.named_parameters())
    assert moved > 0.99 * sum(p.numel() for p in before.values())
    p0 = next(learner.model.parameters())
    assert p0.dtype == torch.float32 and learner.backend.optimizer.state[p0]["exp_avg"].dtype == torch.float32


def test_recomputed_log_probs_score_the_weights_not_a_dropout_mask(model_dir, batch):
    """With LoRA dropout the model stayed in train mode after a step, so a recompute drew its own dropout mask:
    two passes over unchanged weights differed by 0.3 and the next step's ratio was not 1."""
    pytest.importorskip("peft")
    learner = Learner(config(model_dir, backend="torch", lr=1e-2, old_logprobs="recompute",
                             lora=LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets=["q_proj", "v_proj"])))
    learner.step(batch)  # LoRA's B starts at 0: one step makes the adapters (and their dropout) matter
    mask = batch.completion_mask
    torch.testing.assert_close(learner.logprobs(batch) * mask, learner.logprobs(batch) * mask, atol=0, rtol=0)


def test_recompute_with_a_behaviour_weight_cap_weights_tokens_sampled_by_other_weights(model_dir, batch):
    """Engine log-probs log(2) below the learner's on every token (weights that sampled them less often than the
    current policy would): decoupled PPO weighs each token's loss by min(2, cap = 1.5), so the ratio-one loss of
    the test above is scaled by 1.5."""
    learner = Learner(config(model_dir, old_logprobs="recompute", behaviour_weight_cap=1.5))
    mask = batch.completion_mask
    behaviour = (learner.logprobs(batch) - math.log(2.0)) * mask
    stats = learner.step(replace(batch, old_logprobs=behaviour))
    assert stats[BEHAVIOUR_WEIGHT_MEAN] == pytest.approx(1.5) and stats[BEHAVIOUR_WEIGHT_CAPPED] == pytest.approx(1.0)
    lengths, adv = np.array(COMPLETION_LENGTHS, dtype=float), np.array(ADVANTAGES)
    assert stats[LOSS_TOTAL] == pytest.approx(-1.5 * (adv * lengths).sum() / lengths.sum(), rel=1e-5)


# ---------------------------------------------------------------- two ranks, Ray actors



@pytest.mark.slow
def test_two_zero3_ranks_equal_one(model_dir, ray_cluster, tmp_path):
    """LearnerGroup of 2 Ray actors (ZeRO-3, gloo) vs 1 rank in this process, same global batch:
    same loss, same updated weights (the loss is normalised by the GLOBAL token count)."""
    from transformers import AutoModelForImageTextToText

    from deploy.learner_group import LearnerGroup

    groups = make_groups(model_dir)
    cores = sorted(os.sched_getaffinity(0))
    pinned = f"{cores[0]}|{cores[-1]}"  # each rank on a core of its own (where there are two)
    group = LearnerGroup(config(model_dir, world_size=2, cpu_cores=pinned),
                         env_vars={"TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR, "DS_ACCELERATOR": "cpu"})
    try:
        assert [(r["cpu_affinity"], r["torch_threads"]) for r in group.ranks] == [([cores[0]], 1), ([cores[-1]], 1)]
        # Both ranks run in one STRICT_PACK placement group (one node: the rendezvous is on loopback).
        table = ray_cluster.util.placement_group_table(group.placement_group)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
        in_group = ray_cluster.get([actor.__ray_call__.remote(_placement_group_id) for actor in group.actors])
        assert in_group == [group.placement_group.id.hex()] * 2
        assert ray_cluster.get([actor.__ray_call__.remote(_master_addr) for actor in group.actors]) == ["127.0.0.1"] * 2
        global_batch = group.collate(groups)  # advantages from the rewards, collated on the driver
        pieces = group.split(global_batch)
        assert [p.num_samples for p in pieces] == [4, 4]
        two = group.step(groups)
        two_weights = assemble_state_dict(group.export_weights())[1]
        # ZeRO-3 generation on 2 ranks (each decodes in step, gathering parameters layer by layer).
        two_ids = group.greedy_completion(fixed_prompt(model_dir), max_new_tokens=6)
        saved = group.save_pretrained(tmp_path / "policy")
    finally:
        group.shutdown()
    one = Learner(config(model_dir))
    one_stats = one.step(global_batch)
    assert two[TOKENS] == one_stats[TOKENS]
    assert two[LOSS_TOTAL] == pytest.approx(one_stats[LOSS_TOTAL], rel=1e-6)
    assert two[GRAD_NORM] == pytest.approx(one_stats[GRAD_NORM], rel=1e-5)
    one_weights = weights(one)
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, atol=1e-6, rtol=0, msg=name)
    assert one.greedy_completion(fixed_prompt(model_dir), max_new_tokens=6) == two_ids
    loaded = AutoModelForImageTextToText.from_pretrained(saved).state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in two_weights.items())


def _placement_group_id(actor) -> str | None:
    import ray

    return ray.get_runtime_context().get_placement_group_id()


def _master_addr(actor) -> str:
    return os.environ["MASTER_ADDR"]


def test_pack_placement_meets_at_rank0_node_ip(ray_cluster):
    """``placement_strategy: PACK`` (a group that may span nodes): a PACK placement group, and a rendezvous at the
    node IP of rank 0's bundle where two processes in the group's bundles really form a gloo group.
    One node here, so this shows the address and port work, not a second node."""
    from deploy.learner_group import LearnerGroup

    pack = LearnerConfig(world_size=2, global_batch_samples=8, placement_strategy="PACK")
    group = LearnerGroup._reserve(pack)
    try:
        assert ray_cluster.util.placement_group_table(group)["strategy"] == "PACK"
        address, port = LearnerGroup._rendezvous_address(pack, group)
        assert address == ray_cluster.util.get_node_ip_address()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        join = ray_cluster.remote(_gloo_all_reduce)
        sums = ray_cluster.get([
            join.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle)).remote(
                f"tcp://{address}:{port}", rank=bundle, world_size=2)
            for bundle in range(2)])
        assert sums == [1.0 + 2.0] * 2  # rank r contributes r + 1
    finally:
        ray_cluster.util.remove_placement_group(group)


def test_a_group_that_cannot_form_gives_its_placement_group_back(ray_cluster):
    """Ranks that fail in their constructor (here: no model path) fail the group with the rank's own error,
    and the placement group reserved for them is removed, not left holding the cluster's CPUs."""
    from deploy.learner_group import LearnerGroup

    def reserved() -> list[str]:
        return sorted(k for k, v in ray_cluster.util.placement_group_table().items() if v["state"] != "REMOVED")

    before = reserved()
    with pytest.raises(ray_cluster.exceptions.RayActorError, match="learner.model_path: not set"):
        LearnerGroup(LearnerConfig(world_size=2, global_batch_samples=8))
    assert reserved() == before


def _gloo_all_reduce(init_method: str, *, rank: int, world_size: int) -> float:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)
        return float(value.item())
    finally:
        dist.destroy_process_group()


def fixed_prompt(model_dir: str) -> dict:
    from models.processor import load_processor

    processor = load_processor(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the moth?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[Image.open(io.BytesIO(_png(3)))], return_tensors="pt"))


def test_sft_step_on_zero3_matches_plain_torch_and_lowers_the_nll(model_dir, batch):
    """Supervised steps use the same backend contract: ZeRO-3 with 4 micro-batches == plain torch, and
    repeated steps on one batch drive its NLL down. SFT scores the model's own distribution: the
    reference's RL sampling temperature (0.7) must not change its NLL."""
    from learner.loss import SFT_NLL

    reference = Learner(config(model_dir, backend="torch", lr=1e-3, temperature=0.7))
    zero3 = Learner(config(model_dir, lr=1e-3))
    ref_stats, stats = reference.sft_step(batch), zero3.sft_step(batch)
    assert stats[SFT_NLL] == pytest.approx(ref_stats[SFT_NLL], rel=1e-5)
    assert stats[GRAD_NORM] == pytest.approx(ref_stats[GRAD_NORM], rel=1e-4)
    assert stats[TOKENS] == batch.num_loss_tokens and stats[STEP] == 1
    later = [zero3.sft_step(batch)[SFT_NLL] for _ in range(3)]
    assert later[-1] < stats[SFT_NLL]
