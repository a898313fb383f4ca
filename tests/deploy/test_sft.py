"""SFT data: rows become the sequences the rollout would show the model, with the target answer trained on."""

import itertools

import pytest

from deploy.config import load_run_config, shipped_configs
from deploy.sft import SFTConfig, SupervisedBatches, row_order, sft_learner_config

TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def test_first_epoch_is_easy_first_then_every_epoch_is_a_permutation():
    rows = {f"r{i}": {"difficulty": "hard" if i % 3 == 0 else "easy"} for i in range(12)}
    order = row_order(rows, seed=1, easy_first=True)
    first, second = list(itertools.islice(order, 12)), list(itertools.islice(order, 12))
    assert sorted(first) == sorted(rows) and sorted(second) == sorted(rows)
    assert [rows[i]["difficulty"] for i in first] == ["easy"] * 8 + ["hard"] * 4
    assert [rows[i]["difficulty"] for i in second] != ["easy"] * 8 + ["hard"] * 4  # later epochs mixed
    assert list(itertools.islice(row_order(rows, seed=1, easy_first=True), 24)) == first + second  # seeded


def test_sft_config_checks_batch_geometry():
    with pytest.raises(ValueError, match="micro_batch_samples"):
        SFTConfig(batch_samples=10, micro_batch_samples=4)
    with pytest.raises(ValueError, match="sft.batch_samples"):
        load_run_config(TINY_CPU, ["sft.batch_samples=6", "sft.micro_batch_samples=3", "learner.world_size=4",
                                   "learner.micro_batch_samples=4"])


def test_sft_learner_takes_sfts_batch_optimiser_and_cpus():
    from learner.config import LearnerConfig

    rl = LearnerConfig(lr=5e-5, global_batch_samples=64, micro_batch_samples=16, num_cpus_per_rank=1, kl_coef=0.1,
                       cpu_cores="1")
    sft = SFTConfig(steps=50, batch_samples=32, micro_batch_samples=8, lr=5e-4, warmup_steps=5, num_cpus_per_rank=2)
    got = sft_learner_config(rl, sft, model_path="m")
    assert (got.lr, got.global_batch_samples, got.micro_batch_samples, got.max_steps) == (5e-4, 32, 8, 50)
    assert (got.num_cpus_per_rank, got.kl_coef, got.schedule, got.model_path) == (2, 0.0, "constant", "m")
    assert got.cpu_cores is None  # RL's pinning is for sharing the node with rollout engines; SFT runs alone
    unset = sft.model_copy(update={"num_cpus_per_rank": None})
    assert sft_learner_config(rl, unset, model_path="m").num_cpus_per_rank == 1  # the RL learner's


def test_sft_can_train_the_tower_that_rl_keeps_frozen():
    from learner.config import LearnerConfig

    rl = LearnerConfig(freeze_vision=True, vision_lr_scale=1.0)
    inherited = sft_learner_config(rl, SFTConfig(), model_path="m")
    assert (inherited.freeze_vision, inherited.vision_lr_scale) == (True, 1.0)
    own = sft_learner_config(rl, SFTConfig(freeze_vision=False, vision_lr_scale=0.1), model_path="m")
    assert (own.freeze_vision, own.vision_lr_scale) == (False, 0.1)
    with pytest.raises(ValueError, match="vision_lr_scale"):
        SFTConfig(vision_lr_scale=0.0)


@pytest.mark.parametrize("think", ["brief", "refocus"])
def test_a_row_becomes_the_rollout_prompt_plus_the_target_answer(tiny_model_dir, tmp_path, think):
    from actors.env import ZoomEnv
    from data.prompts import target_completion
    from data.synth import synthesize
    from deploy.training_data import load_training_data
    from models.processor import load_processor
    from rewards.parse import parse_completion

    synthesize(out_dir=tmp_path, seed=0, n=20)
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.0)
    config = load_run_config(TINY_CPU, ["rollout.prompt.system=brief"])
    processor = load_processor(tiny_model_dir)
    batches = SupervisedBatches(data=data, rollout_config=config.rollout, processor=processor, think=think)
    env = ZoomEnv(config=config.rollout.env, prompt=config.rollout.prompt, processor=processor)
    for row_id in list(data.rows)[:4]:
        group = batches.group(row_id, issue=5)
        (trajectory,) = group.trajectories
        assert group.group_id == f"{row_id}#5"
        assert trajectory.prompt_ids == env.reset(data.prompt_group(row_id, issue=0, stage=0))[0]
        row = data.rows[row_id]
        text = target_completion(row, frame="input", think=think, input_size=env.limits.input_size(row["width"], row["height"]))
        assert processor.tokenizer.decode(trajectory.completion_ids) == text + "<|im_end|>"
        assert trajectory.loss_mask == [1] * len(trajectory.completion_ids)
        parsed = parse_completion(trajectory.completion_text)
        assert parsed.strict and parsed.answer.present == row["present"]
