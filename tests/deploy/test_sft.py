"""SFT data: rows become the sequences the rollout would show the model, with the target answer trained on."""

import itertools

import pytest
import torch

from deploy.config import load_run_config, shipped_configs
from deploy.sft import SFTConfig, SupervisedBatches, expected_last_step, row_order, sft_learner_config

TINY_CPU = next(p for p in shipped_configs() if p.name == "tiny-cpu.yaml")


def test_first_epoch_is_easy_first_then_every_epoch_is_a_permutation():
    rows = {f"r{i}": {"difficulty": "hard" if i % 3 == 0 else "easy"} for i in range(12)}
    order = row_order(rows, seed=1, easy_first=True)
    first, second = list(itertools.islice(order, 12)), list(itertools.islice(order, 12))
    assert sorted(first) == sorted(rows) and sorted(second) == sorted(rows)
    assert [rows[i]["difficulty"] for i in first] == ["easy"] * 8 + ["hard"] * 4
    assert [rows[i]["difficulty"] for i in second] != ["easy"] * 8 + ["hard"] * 4  # later epochs mixed
    assert list(itertools.islice(row_order(rows, seed=1, easy_first=True), 24)) == first + second  # seeded


def test_the_expected_last_step_follows_the_time_left_at_the_pace_so_far():
    # no time bound: sft.steps
    assert expected_last_step(10, 500, first_step=0, elapsed_s=15.0, left_s=None) == 500
    # 10 steps in 15 s = 1.5 s per step; 30 s left -> 20 more steps; 31 s -> 21 (the check runs before a step)
    assert expected_last_step(10, 50_000, first_step=0, elapsed_s=15.0, left_s=30.0) == 30
    assert expected_last_step(10, 50_000, first_step=0, elapsed_s=15.0, left_s=31.0) == 31
    # a control from step 500: the pace counts its own steps only (4 in 6 s), never beyond sft.steps
    assert expected_last_step(504, 50_000, first_step=500, elapsed_s=6.0, left_s=3.0) == 506
    assert expected_last_step(504, 505, first_step=500, elapsed_s=6.0, left_s=300.0) == 505
    # time already up: this step is the last
    assert expected_last_step(504, 50_000, first_step=500, elapsed_s=6.0, left_s=-1.0) == 504


def test_sft_config_checks_batch_geometry():
    with pytest.raises(ValueError, match="micro_batch_samples"):
        SFTConfig(batch_samples=10, micro_batch_samples=4)
    with pytest.raises(ValueError, match="sft.batch_samples"):
        load_run_config(TINY_CPU, ["sft.batch_samples=6", "sft.micro_batch_samples=3", "learner.world_size=4",
                                   "learner.micro_batch_samples=4", "cluster.num_cpus=null"])


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
    # The refocus think (overview, focus boxes, summary) needs more than tiny-cpu's 48-token turns.
    config = load_run_config(TINY_CPU, ["rollout.prompt.system=brief", "rollout.sampling.max_tokens=200",
                                        "rollout.env.max_completion_tokens=200"])
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


ZOOM_SFT = ["rollout.prompt.system=brief", "rollout.env.max_turns=2", "rollout.prompt.allow_zoom=true",
            "sft.zoom_context=1.5"]


def test_zoom_traces_need_a_rollout_that_zooms_and_the_brief_think():
    with pytest.raises(ValueError, match="sft.zoom_context"):
        load_run_config(TINY_CPU, ["sft.zoom_context=1.5"])  # rollout.env.max_turns 1
    with pytest.raises(ValueError, match="brief think"):
        SFTConfig(zoom_context=1.5, think="refocus")
    with pytest.raises(ValueError, match="zoom_context"):
        SFTConfig(zoom_context=0.8)
    with pytest.raises(ValueError, match="zoom_names_after"):
        SFTConfig(zoom_names_after=True)  # no zoom traces to name the animal after


def test_names_after_zoom_the_first_turn_thinks_only_present(tiny_model_dir, tmp_path):
    from data.synth import synthesize
    from deploy.training_data import load_training_data
    from models.processor import load_processor
    from rewards.parse import parse_completion
    from rewards.think import follows_brief_think

    synthesize(out_dir=tmp_path, seed=0, n=20)
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.0)
    config = load_run_config(TINY_CPU, ["sft.steps=20", *ZOOM_SFT, "sft.zoom_names_after=true"])
    assert config.sft.zoom_names_after
    processor = load_processor(tiny_model_dir)
    row_id = next(i for i, row in data.rows.items() if row["boxes"])
    category = data.rows[row_id]["category"]
    texts = {}
    for after in (False, True):
        batches = SupervisedBatches(data=data, rollout_config=config.rollout, processor=processor, think="brief",
                                    zoom_context=1.5, zoom_names_after=after)
        texts[after] = batches.group(row_id, issue=0).trajectories[0].completion_text
    assert texts[False].startswith(f"<think>present {category}</think><zoom>")
    assert texts[True].startswith("<think>present</think><zoom>")
    # the answer turn is the same: it names the animal, and the brief think rule reads that last think
    assert texts[True].split("</zoom>")[1] == texts[False].split("</zoom>")[1]
    assert f"<think>present {category}</think><answer>" in texts[True]
    parsed = parse_completion(texts[True])
    assert parsed.strict and follows_brief_think(parsed, synonyms={}) is parsed


def test_a_row_with_an_animal_becomes_a_zoom_then_an_answer_about_the_crop(tiny_model_dir, tmp_path):
    """The trace is what a rollout would hold had the model written its two turns: the environment's own
    tokens and crop between them (not trained on), and an answer whose boxes, read in the crop's frame
    as the evaluation reads them, are the ground truth."""
    from actors.env import ZOOM, ZoomEnv, decode_image, parse_zoom, zoom_region
    from data.synth import synthesize
    from deploy.evaluate import score_sample
    from deploy.training_data import load_training_data
    from learner.batch import collate
    from models.processor import load_processor
    from rewards.parse import parse_completion
    from rewards.think import follows_brief_think

    synthesize(out_dir=tmp_path, seed=0, n=20)
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.0)
    config = load_run_config(TINY_CPU, ["sft.steps=20", *ZOOM_SFT])
    processor = load_processor(tiny_model_dir)
    batches = SupervisedBatches(data=data, rollout_config=config.rollout, processor=processor, think="brief",
                                zoom_context=1.5)
    env = ZoomEnv(config=config.rollout.env, prompt=config.rollout.prompt, processor=processor)
    tokenizer = processor.tokenizer
    present = [i for i, row in data.rows.items() if row["boxes"]]
    absent = [i for i, row in data.rows.items() if not row["boxes"]]
    assert present and absent
    for row_id in present[:3]:
        row = data.rows[row_id]
        (trajectory,) = batches.group(row_id, issue=0).trajectories
        region = zoom_region(row["boxes"], width=row["width"], height=row["height"], context=1.5, min_side=28)
        assert trajectory.zoom_boxes == [list(map(float, region))]
        crop = decode_image(trajectory.zoom_images[0])
        assert crop.size == env.limits.input_size(*crop.size)  # shown at a size the processor keeps
        # model tokens (mask 1) are exactly the two turns' text; the rest is the environment's turn
        model = [t for t, m in zip(trajectory.completion_ids, trajectory.loss_mask) if m]
        assert tokenizer.decode(model) == trajectory.completion_text + "<|im_end|>"
        first_turn = trajectory.completion_text.split("</zoom>")[0] + "</zoom>"
        outcome, box = parse_zoom(first_turn)
        prompt_ids, episode = env.reset(data.prompt_group(row_id, issue=0, stage=0))
        assert outcome == ZOOM and trajectory.prompt_ids == prompt_ids
        seen = env.step(episode, box, last_token=None)
        env_part = trajectory.completion_ids[len(tokenizer(first_turn, add_special_tokens=False)["input_ids"]):]
        assert env_part[:len(seen.token_ids)] == seen.token_ids
        assert trajectory.loss_mask.count(0) == len(seen.token_ids)
        parsed = parse_completion(trajectory.completion_text)
        assert parsed.strict and follows_brief_think(parsed, synonyms={}) is parsed
        score = score_sample(trajectory, row_id=row_id, task=row["task"], target=data.prompt_group(
            row_id, issue=0, stage=0).target, config=config, limits=env.limits)
        assert score.iou > 0.9  # the crop-frame boxes map back onto the ground truth (rounding only)
    (plain,) = batches.group(absent[0], issue=0).trajectories
    assert plain.zoom_images == [] and plain.loss_mask == [1] * len(plain.completion_ids)
    assert "<zoom>" not in plain.completion_text
    # the learner batch carries the crop as a second image of its row
    groups = [batches.group(present[0], issue=0), batches.group(absent[0], issue=0)]
    batch = collate(groups, image_processor=processor.image_processor, pad_token_id=tokenizer.pad_token_id,
                    advantages=[[0.0]] * 2)
    assert [len(images) for images in batch.image_index] == [2, 1]


def test_jittered_zoom_traces_vary_the_crop_keep_the_animal_in_it_and_are_reproducible(tiny_model_dir, tmp_path):
    """With zoom_jitter the answer turn cannot learn "the animal is the crop's centre two thirds": the
    region's size and place vary with the step, always holding the boxes; a step rebuilds the same trace."""
    from data.synth import synthesize
    from deploy.training_data import load_training_data
    from models.processor import load_processor

    synthesize(out_dir=tmp_path, seed=0, n=20)
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.0)
    config = load_run_config(TINY_CPU, ["sft.steps=20", *ZOOM_SFT, "sft.zoom_jitter=1.0"])
    processor = load_processor(tiny_model_dir)
    batches = SupervisedBatches(data=data, rollout_config=config.rollout, processor=processor, think="brief",
                                zoom_context=1.5, zoom_jitter=1.0)
    row_id = next(i for i, row in data.rows.items() if row["boxes"])
    (x1, y1, x2, y2), = data.rows[row_id]["boxes"][:1]
    regions = []
    for issue in range(8):
        (trajectory,) = batches.group(row_id, issue=issue).trajectories
        left, top, right, bottom = trajectory.zoom_boxes[0]
        assert left <= x1 and top <= y1 and x2 <= right + 0.5 and y2 <= bottom + 0.5  # rounding: half a pixel
        regions.append(trajectory.zoom_boxes[0])
    assert len({tuple(r) for r in regions}) >= 6  # sizes and places vary from step to step
    assert batches.group(row_id, issue=3).trajectories[0].zoom_boxes == [regions[3]]  # a step rebuilds its crop


def test_an_average_window_must_fit_in_the_run():
    SFTConfig(steps=500, average_last=8, average_every=25)  # snapshots at 325 ... 500
    with pytest.raises(ValueError, match="average_last"):
        SFTConfig(steps=100, average_last=8, average_every=25)  # would reach back to step -75


class _SavesWeights:
    """Stands in for the LearnerGroup (Ray actors, minutes to start): save_pretrained writes the tiny model's
    weights scaled by the step, so each snapshot differs and their mean is known. The real group saves snapshots
    in tests/e2e/test_pipeline.py."""

    def __init__(self, model_dir):
        self.model_dir, self.step = model_dir, 0

    def save_pretrained(self, out_dir):
        import shutil

        from safetensors.torch import load_file, save_file

        shutil.copytree(self.model_dir, out_dir)
        weights = load_file(out_dir / "model.safetensors")
        save_file({k: t * self.step if t.is_floating_point() else t for k, t in weights.items()},
                  out_dir / "model.safetensors", metadata={"format": "pt"})


def test_snapshots_keep_the_last_k_and_average_them(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from deploy.sft import WeightSnapshots

    snapshots, learner = WeightSnapshots(tmp_path / "snapshots", keep=3, every=25), _SavesWeights(tiny_model_dir)
    for step in (25, 50, 75, 100, 113):  # 113: the last step of a run stopped on max_seconds
        learner.step = step
        snapshots.take(learner, step)
    assert snapshots.steps() == [75, 100, 113]
    assert snapshots.average(tmp_path / "average") == [75, 100, 113]
    original = load_file(tiny_model_dir / "model.safetensors")
    averaged = load_file(tmp_path / "average" / "model.safetensors")
    name = next(k for k, t in original.items() if t.is_floating_point() and t.abs().sum() > 0)
    torch.testing.assert_close(averaged[name], original[name] * (75 + 100 + 113) / 3, rtol=1e-5, atol=1e-6)


def test_a_resume_drops_the_snapshots_past_its_checkpoint(tiny_model_dir, tmp_path):
    from deploy.sft import WeightSnapshots

    snapshots, learner = WeightSnapshots(tmp_path / "snapshots", keep=4, every=25), _SavesWeights(tiny_model_dir)
    for step in (25, 50, 75):
        snapshots.take(learner, step)
    snapshots.discard_after(50)  # the run died after step 75's snapshot; its last checkpoint was at 50
    assert snapshots.steps() == [25, 50]


def test_a_continued_run_averages_over_the_snapshots_of_the_run_it_continues(tiny_model_dir, tmp_path):
    from deploy.sft import WeightSnapshots

    earlier, learner = WeightSnapshots(tmp_path / "earlier", keep=4, every=25), _SavesWeights(tiny_model_dir)
    for step in (25, 50, 75, 80):  # 80: the earlier run's last step, past the checkpoint (75) continued from
        learner.step = step
        earlier.take(learner, step)
    continued = WeightSnapshots(tmp_path / "continued", keep=3, every=25)
    continued.continue_from(tmp_path / "earlier", step=75)  # not 80: the continued run trains its own steps 76+
    assert continued.steps() == [25, 50, 75] and earlier.steps() == [25, 50, 75, 80]
    learner.step = 100
    continued.take(learner, 100)
    assert continued.steps() == [50, 75, 100]
    continued.continue_from(tmp_path / "continued", step=100)  # its own directory: nothing to take in
    assert continued.steps() == [50, 75, 100]


def test_a_run_in_parts_averages_the_snapshots_an_uninterrupted_run_would(tiny_model_dir, tmp_path, caplog):
    """The end of a part off the every-25 grid (stopped on max_seconds at 60; a run of 110 steps extended to 130)
    is replaced by the next snapshot, as an uninterrupted run never took it."""
    from deploy.sft import WeightSnapshots

    learner = _SavesWeights(tiny_model_dir)

    def run(snapshots, steps):
        for step in steps:
            snapshots.take(learner, step)
        return snapshots.steps()

    assert run(WeightSnapshots(tmp_path / "whole", keep=4, every=25), (25, 50, 75, 100)) == [25, 50, 75, 100]
    parts = WeightSnapshots(tmp_path / "parts", keep=4, every=25)
    assert run(parts, (25, 50, 60)) == [25, 50, 60]  # the first part's end
    parts.discard_after(60)  # the resume starts from the checkpoint at 60
    assert run(parts, (75, 100)) == [25, 50, 75, 100]
    extended = WeightSnapshots(tmp_path / "extended", keep=4, every=25)
    assert run(extended, (25, 50, 75, 100, 110)) == [50, 75, 100, 110]
    assert run(extended, (125, 130)) == [75, 100, 125, 130]  # as a fresh 130-step run: not 100, 110, 125, 130
    # A control continued from a checkpoint whose snapshots its run had pruned says what its average lacks.
    continued = WeightSnapshots(tmp_path / "continued", keep=4, every=25)
    continued.continue_from(tmp_path / "extended", step=100)
    assert continued.steps() == [75, 100] and "none at steps [25, 50]" in caplog.text


def test_sft_does_not_mirror_what_rl_mirrors(tiny_model_dir, tmp_path):
    """data.rl_mirror is RL's: SFT's prompt must show the row as stored, since its target is built from it."""
    from data.synth import synthesize
    from deploy.training_data import load_training_data
    from models.processor import load_processor

    synthesize(out_dir=tmp_path, seed=0, n=20)
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.0)
    data.mirror = True
    row_id = next(i for i, r in data.rows.items() if r["boxes"])
    assert data.prompt_group(row_id, issue=1, stage=0).image != data.rows[row_id]["image"]  # RL's view: mirrored
    config = load_run_config(TINY_CPU, ["rollout.prompt.system=brief"])
    batches = SupervisedBatches(data=data, rollout_config=config.rollout, processor=load_processor(tiny_model_dir),
                                think="brief")
    assert batches.group(row_id, issue=1).prompt.image == data.rows[row_id]["image"]


def test_rows_whose_answer_the_rollout_could_not_write_are_left_out(tiny_model_dir, tmp_path, caplog):
    """A row of four boxes needs 90 tokens of the tiny tokenizer (one box: at most 43): taught it under a 50-token
    turn, the model would learn an answer that RL and the evaluation cut short, so SFT leaves it out and says so;
    with every row too long it refuses."""
    from data.synth import synthesize
    from deploy.training_data import load_training_data
    from models.processor import load_processor

    synthesize(out_dir=tmp_path, seed=0, n=20)
    data = load_training_data(tmp_path / "train.parquet", max_bad_fraction=0.0)
    crowded = next(i for i, r in data.rows.items() if r["boxes"])
    box = data.rows[crowded]["boxes"][0]
    data.rows[crowded] = {**data.rows[crowded], "boxes": [box] * 4}
    processor = load_processor(tiny_model_dir)

    def batches(max_tokens: int) -> SupervisedBatches:
        config = load_run_config(TINY_CPU, [f"rollout.sampling.max_tokens={max_tokens}"])
        return SupervisedBatches(data=data, rollout_config=config.rollout, processor=processor, think="brief")

    fitting = batches(50)
    assert fitting.left_out == 1 and crowded not in fitting.data.rows
    assert set(fitting.data.rows) == set(data.rows) - {crowded} and crowded in data.rows  # the caller's rows kept
    assert f"leaves out 1 of {len(data.rows)} rows" in caplog.text and repr(crowded) in caplog.text
    assert batches(90).left_out == 0
    with pytest.raises(ValueError, match="every SFT row's answer is longer than the rollout's limit of 5 tokens"):
        batches(5)
