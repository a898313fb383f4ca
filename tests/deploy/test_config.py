"""RunConfig: every shipped config validates; invalid ones fail at load naming the field."""

import subprocess
import sys

import pytest

from deploy.config import CONFIG_DIR, RunConfig, load_run_config, shipped_configs
from deploy.config_loading import ConfigError, apply_overrides


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_run_config(path)
    assert isinstance(config, RunConfig)


def test_shipped_configs_include_the_default_and_the_paper_scale():
    names = {p.name for p in shipped_configs()}
    assert {"tiny-cpu.yaml", "qwen2.5-vl-7b-8gpu.yaml"} <= names
    paper = load_run_config([p for p in shipped_configs() if p.name == "qwen2.5-vl-7b-8gpu.yaml"][0])
    assert paper.rollout.sampling.n == 4 and paper.rollout.sampling.temperature == 1.0
    assert paper.cluster.rollout_workers * paper.cluster.rollout_gpus == 4
    assert paper.learner.world_size * paper.learner.num_gpus_per_rank == 4
    assert paper.learner.kl_coef == 0.0 and paper.learner.eps_high > paper.learner.eps_low


def test_dotted_overrides_are_typed_and_applied_before_validation():
    config = load_run_config(None, ["learner.lr=1e-6", "train.mode=async", "rollout.sampling.n=4",
                                    "curriculum.start_stage=1"])
    assert config.learner.lr == 1e-6 and isinstance(config.learner.lr, float)
    assert config.train.mode == "async" and config.curriculum.start_stage == 1


def test_train_difficulty_loads_with_a_curriculum_that_draws_only_that_difficulty():
    hard_only = [override for i in range(3) for override in (f"curriculum.stages.{i}.difficulty_weights.easy=0",
                                                              f"curriculum.stages.{i}.difficulty_weights.hard=1")]
    config = load_run_config(CONFIG_DIR / "fewshot-cpu.yaml", ["data.train_difficulty=hard", *hard_only])
    assert config.data.train_difficulty == "hard"
    assert all(stage.difficulty_weights == {"easy": 0.0, "hard": 1.0} for stage in config.curriculum.stages)


def test_overrides_do_not_modify_their_input():
    document = {"learner": {"lr": 1.0}}
    assert apply_overrides(document, ["learner.lr=2"]) == {"learner": {"lr": 2}}
    assert document == {"learner": {"lr": 1.0}}


# Each row: overrides on top of the defaults → a fragment the error must contain (the field, the reason).
INVALID = [
    (["learner.eps_high=0.1", "learner.eps_low=0.2"], "eps_high"),
    (["rollout.sampling.n=1", "learner.global_batch_samples=4"], "rollout.sampling.n"),
    (["learner.global_batch_samples=12"], "learner.global_batch_samples"),
    (["cluster.rollout_workers=3"], "cluster.rollout_workers"),
    (["learner.world_size=3"], "world_size"),
    (["data.eval_splits=[]"], "data.eval_splits"),
    (["train.verify_weight_sync=true", "rollout.engine.backend=vllm", "rollout.engine.track_checksum=false"],
     "rollout.engine.track_checksum=true"),
    (["rollout.engine.backend=hf", "rollout.engine.max_batch_sequences=2"],
     "engine.max_batch_sequences (2) must be >="),
    (["learner.lr=-1"], "learner.lr"),
    (["learner.lrate=0.1"], "learner.lrate"),
    (["train.mode=sometimes"], "train.mode"),
    (["data.train_difficulty=medium"], "data.train_difficulty"),
    (["data.train_difficulty=hard"], "curriculum.stages.0.difficulty_weights draws ['easy', 'hard']"),
    (["rollout.sampling.temperature=9"], "rollout.sampling.temperature"),
    (["rollout.sampling.temperature=0.7"], "learner.temperature (1.0) must equal rollout.sampling.temperature (0.7)"),
    (["rewards.frame.kind=norm1000"], "rewards.frame.kind"),
    (["curriculum.start_stage=7"], "start_stage"),
    (["model.path=builtin:huge"], "model.path"),
    (["learner.model_path=/somewhere"], "learner.model_path"),
    (["metrics.port=70000"], "metrics.port"),
    (["train.buffer_capacity=2"], "train.buffer_capacity"),
    (["rewards.custom_reward=os.system('x')"], "custom_reward"),
    (["learner.cpu_cores=1;2"], "learner.cpu_cores"),
    (["learner.placement_strategy=SPREAD"], "learner.placement_strategy"),
    (["learner.cpu_cores=3-1"], "runs backwards"),
    (["learner.cpu_cores=0|1|2", "learner.world_size=2", "learner.global_batch_samples=16"], "3 lists for 2 ranks"),
    (["rollout.engine.backend=hf", "rollout.engine.cpu_cores=0"], "cpu_cores"),
    (["learner.schedule=cosine", "learner.max_steps=1000", "train.steps=100"],
     "learner.max_steps (1000) must equal train.steps (100)"),
    (["rollout.sampling.top_p=0.9"], "rollout.sampling.top_p (0.9) < 1 needs learner.old_logprobs=recompute"),
    (["rollout.engine.backend=vllm", "rollout.engine.tensor_parallel_size=2", "cluster.rollout_gpus=1"],
     "rollout.engine.tensor_parallel_size (2) must equal cluster.rollout_gpus (1)"),
    # the last update must be the decay's end (min_lr_ratio); after a 9-step warm-up of 10 steps it ran at the peak lr
    (["learner.schedule=cosine", "learner.max_steps=10", "train.steps=10", "learner.warmup_steps=9"],
     "warmup_steps (9) leaves the cosine schedule no update to decay over"),
    (["train.eval_modes=[greedy, greedy]"], "train.eval_modes: Value error, each mode at most once"),
    (["learner.kl_coef=.inf"], "learner.kl_coef"),  # the loss was NaN from the first step
    (["learner.advantage_eps=.inf"], "learner.advantage_eps"),  # every advantage 0
    (["learner.behaviour_weight_cap=2"], "behaviour_weight_cap (2.0) needs old_logprobs: recompute"),
    (["learner.old_logprobs=recompute", "learner.behaviour_weight_cap=0.5"], "behaviour_weight_cap"),
    # the job's control actor refuses such a count after model, data and SFT: caught at load instead
    (["cluster.rollout_workers=4", "cluster.max_rollout_workers=2"], "rollout_workers (4) must lie within"),
    # one turn of at most 256 model tokens: a ramp from 3,584 to 4,096 is never reached
    (["rewards.overlong.l_max=4096", "rewards.overlong.l_cache=512"], "rewards.overlong: its ramp starts at"),
]


@pytest.mark.parametrize("overrides, field", INVALID, ids=[row[1] for row in INVALID])
def test_invalid_configs_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        load_run_config(None, overrides)
    assert field in str(error.value)


def test_overrides_index_into_lists_written_in_the_file():
    tiny = [p for p in shipped_configs() if p.name == "tiny-cpu.yaml"][0]
    config = load_run_config(tiny, ["curriculum.stages.1.advance.patience=4"])
    assert config.curriculum.stages[1].advance.patience == 4
    with pytest.raises(ConfigError, match="colour"):
        load_run_config(tiny, ["curriculum.stages.0.reward_weights.colour=1"])
    with pytest.raises(ConfigError, match="no item 9"):
        load_run_config(tiny, ["curriculum.stages.9.advance.patience=4"])


def test_a_mapping_override_is_merged_into_its_section_not_put_in_its_place():
    # small-cpu writes train.mode async, output_dir, eval_limit ...; replaced whole, the section fell back to
    # the defaults for all of them, and `refocus submit` lost its run name (set before the user's overrides).
    small = [p for p in shipped_configs() if p.name == "small-cpu.yaml"][0]
    plain = load_run_config(small)
    merged = load_run_config(small, ["train.run_name=job-1", "train={checkpoint_every: 50, eval_at_end: false}"])
    assert (merged.train.checkpoint_every, merged.train.eval_at_end) == (50, False)
    assert merged.train.run_name == "job-1"
    assert (merged.train.mode, merged.train.output_dir, merged.train.eval_limit) == (
        plain.train.mode, plain.train.output_dir, plain.train.eval_limit)
    assert load_run_config(small, ["train.eval_modes=[greedy, sampled]"]).train.eval_modes == ["greedy", "sampled"]


def test_overrides_index_into_lists_left_at_their_default():
    # The paper-scale config writes no stages; its own comment suggests this override.
    paper = [p for p in shipped_configs() if p.name == "qwen2.5-vl-7b-8gpu.yaml"][0]
    config = load_run_config(paper, ["curriculum.stages.2.reward_weights.overlong=1"])
    defaults = RunConfig().curriculum.stages
    assert config.curriculum.stages[2].reward_weights == {**defaults[2].reward_weights, "overlong": 1.0}
    assert config.curriculum.stages[:2] == defaults[:2]
    with pytest.raises(ConfigError, match="no item 7 in a list of 3"):
        load_run_config(paper, ["curriculum.stages.7.advance.patience=4"])


def test_an_item_of_a_list_of_values_a_default_dict_and_a_list_item_mapping_take_overrides_as_documented():
    small = [p for p in shipped_configs() if p.name == "small-cpu.yaml"][0]
    plain = load_run_config(small)
    # one item of a list of plain values: refused before as "not a section"
    assert load_run_config(small, ["data.eval_splits.1=test_easy"]).data.eval_splits == [plain.data.eval_splits[0],
                                                                                         "test_easy"]
    with pytest.raises(ConfigError, match="no item 5 in a list of 2"):
        load_run_config(small, ["data.eval_splits.5=test_easy"])
    # one key of a dict field left at its default: the other keys stay (it became {"iou": 2.0})
    weights = load_run_config(small, ["rewards.default_weights.iou=2"]).rewards.default_weights
    assert weights == {**plain.rewards.default_weights, "iou": 2.0}
    # a mapping into a list item is merged into it, as into a section (it reset the stage's other fields)
    stage = load_run_config(small, ["curriculum.stages.2={name: iou_only}"]).curriculum.stages[2]
    assert stage == plain.curriculum.stages[2].model_copy(update={"name": "iou_only"})


@pytest.mark.parametrize("override, message", [
    ("train.output_dir=runs/exp #2", "starts a YAML comment"),
    ("train.output_dir=# all of it", "starts a YAML comment"),
    ("train.eval_modes=[greedy", "not valid YAML"),
    ("data.path=@x", "not valid YAML"),
    ("train.eval_modes.0.mode=greedy", "train.eval_modes.0 is not a section"),
    ("train.steps=true", "train.steps: expected a number, got true"),
    ("train.dynamic_sampling=1", "train.dynamic_sampling: expected true or false, got 1"),
    ("curriculum.stages.0.reward_weights.format=true", "curriculum.stages.0.reward_weights.format: expected a number"),
])
def test_an_override_is_refused_rather_than_read_otherwise(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_run_config(None, [override])


def test_a_quoted_override_keeps_its_hash_and_numbers_stay_numbers():
    config = load_run_config(None, ['train.output_dir="runs/exp #2"', "learner.lr=1", "data.path=a#b"])
    assert config.train.output_dir == "runs/exp #2" and config.learner.lr == 1.0 and config.data.path == "a#b"


@pytest.mark.parametrize("overrides, message", [
    # small-cpu's RL: learner 1 + rollout 1 x 0.5 + reward 1 x 0.25 = 1.75 CPUs; its SFT rank takes 2.
    (["cluster.num_cpus=1"], r"cluster.num_cpus \(1\) cannot hold RL's actors: 1.75 CPUs"),
    (["sft.num_cpus_per_rank=3"], r"sft.num_cpus_per_rank \(3\) x learner.world_size \(1\) exceeds"),
    (["cluster.rollout_cpus=.inf"], "cluster.rollout_cpus"),
    (["learner.num_cpus_per_rank=.nan"], "learner.num_cpus_per_rank"),
])
def test_a_local_ray_that_cannot_hold_the_actors_fails_at_load(overrides, message):
    small = [p for p in shipped_configs() if p.name == "small-cpu.yaml"][0]
    load_run_config(small)  # as shipped it fits its 2 CPUs
    with pytest.raises(ConfigError, match=message):
        load_run_config(small, overrides)
    # On a cluster Ray decides where actors fit: not checked.
    load_run_config(small, ["cluster.address=auto", "cluster.num_cpus=1"])


def test_invalid_yaml_file_names_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  eps_low: 0.5\n  eps_high: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*eps_high"):
        load_run_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(bad)


def test_cli_reports_a_bad_config_in_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "config", "check", "--set", "learner.lr=-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "learner.lr" in out.stderr and "Traceback" not in out.stderr


def test_a_config_can_start_from_a_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  prompts_per_step: 2\nlearner:\n  global_batch_samples: 8\n"
                                        "cluster:\n  rollout_workers: 1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    config = load_run_config(tmp_path / "child.yaml")
    assert config.train.steps == 9 and config.train.prompts_per_step == 2  # merged key by key
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_run_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("main_file, fewshot_file", [("small-cpu.yaml", "fewshot-cpu.yaml"),
                                                     ("zoom-cpu.yaml", "fewshot-zoom-cpu.yaml")])
def test_a_fewshot_config_is_its_main_job_on_500_images(main_file, fewshot_file):
    main = load_run_config(CONFIG_DIR / main_file)
    fewshot = load_run_config(CONFIG_DIR / fewshot_file)
    assert fewshot.data.train_limit == 500 and main.data.train_limit is None
    assert fewshot.rollout == main.rollout
    assert fewshot.sft == main.sft and fewshot.learner == main.learner and fewshot.curriculum == main.curriculum
    assert fewshot.train.output_dir != main.train.output_dir


def test_cpu_core_lists_per_rank():
    from actors.config import parse_cpu_list
    from learner.config import LearnerConfig

    assert parse_cpu_list("0,2-4,3") == [0, 2, 3, 4]
    shared = LearnerConfig(cpu_cores="1", world_size=2, global_batch_samples=8)
    assert shared.rank_cpu_cores(0) == shared.rank_cpu_cores(1) == [1]
    split = LearnerConfig(cpu_cores="0-1|2-3", world_size=2, global_batch_samples=8)
    assert (split.rank_cpu_cores(0), split.rank_cpu_cores(1)) == ([0, 1], [2, 3])
    assert LearnerConfig().rank_cpu_cores(0) is None


def test_a_decaying_rl_schedule_ending_at_the_last_step_validates():
    config = load_run_config(None, ["learner.schedule=cosine", "learner.max_steps=100", "train.steps=100"])
    assert (config.learner.schedule, config.learner.max_steps) == ("cosine", 100)


def test_an_overlong_penalty_the_completions_can_reach_validates():
    # its ramp starts at 192 of one turn's 256 tokens; below, at 600 of three turns' 768
    load_run_config(None, ["rewards.overlong.l_max=256", "rewards.overlong.l_cache=64"])
    load_run_config(None, ["rewards.overlong.l_max=700", "rewards.overlong.l_cache=100", "rollout.env.max_turns=3",
                           "rollout.prompt.allow_zoom=true"])


def test_top_p_below_one_validates_with_recomputed_old_logprobs():
    load_run_config(None, ["rollout.sampling.top_p=0.9", "learner.old_logprobs=recompute"])  # no error
