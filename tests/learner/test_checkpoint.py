"""Checkpoints: atomic layout, skipping partial ones, and resume giving the uninterrupted run's next step."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup  # noqa: E402
from learner import checkpoint as ckpt  # noqa: E402
from learner.batch import LearnerBatch, collate  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.export import assemble_state_dict  # noqa: E402
from learner.learner import LR, Learner  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXTENSIONS_DIR = str(REPO / ".cache" / "torch_extensions")
EXTRA_STATE = {"curriculum": {"stage": 2, "history": [0.1, 0.25]}, "data_position": 17}




def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_groups(model_dir: str, *, seed: int) -> list[TrajectoryGroup]:
    """2 groups × 4 samples with random completions, behaviour log-probs -1 and random rewards."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(2):
        prompt = ([config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]
                  + rng.integers(20, 500, 4).tolist())
        trajectories = []
        for i in range(4):
            n = int(rng.integers(3, 12))
            trajectories.append(Trajectory(sample_index=i, prompt_ids=prompt, completion_ids=rng.integers(20, 500, n).tolist(),
                                           behaviour_logprobs=[-1.0] * n, loss_mask=[1] * n, completion_text="",
                                           reward=float(rng.random())))
        groups.append(TrajectoryGroup(
            prompt=PromptGroup(group_id=f"s{seed}g{g}", prompt_id=f"g{g}", task="camo", difficulty="easy", question="?",
                               image=_png(seed * 10 + g), target=Target(False, None, [], 56, 56), stage=1),
            trajectories=trajectories, policy_version=0))
    return groups


def make_batch(model_dir: str, *, seed: int) -> LearnerBatch:
    from transformers import AutoImageProcessor

    from learner.advantages import group_advantages

    groups = make_groups(model_dir, seed=seed)
    advantages = group_advantages([[t.reward for t in g.trajectories] for g in groups])
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return collate(groups, image_processor=processor, pad_token_id=0, advantages=advantages)


@pytest.fixture(scope="module")
def batches(model_dir) -> list[LearnerBatch]:
    return [make_batch(model_dir, seed=seed) for seed in range(3)]


def config(model_dir: str, **overrides) -> LearnerConfig:
    # A schedule that changes the lr every step, weight decay and clipping: all of it must resume.
    base = dict(model_path=model_dir, global_batch_samples=8, micro_batch_samples=2, lr=1e-3, weight_decay=0.1,
                grad_clip=0.5, schedule="cosine", warmup_steps=0, max_steps=4)
    return LearnerConfig(**{**base, **overrides})


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return assemble_state_dict(learner.export_weights())[1]


# ---------------------------------------------------------------- directory protocol


def _fake_checkpoint(root: Path, step: int, *, complete: bool) -> Path:
    path = root / ckpt.step_dir_name(step)
    path.mkdir(parents=True)
    if complete:
        (path / ckpt.COMPLETE_MARKER).write_text("ok\n")
    return path


def test_latest_complete_skips_partial_and_orders_numerically(tmp_path):
    assert ckpt.latest_complete(tmp_path / "missing") is None
    assert ckpt.latest_complete(tmp_path) is None
    _fake_checkpoint(tmp_path, 9, complete=True)
    ten = _fake_checkpoint(tmp_path, 10, complete=True)  # 10 > 9 although "step_10" < "step_9" as text
    _fake_checkpoint(tmp_path, 11, complete=False)  # renamed, crashed before the marker
    (tmp_path / "step_12.tmp").mkdir()  # crashed while writing
    (tmp_path / ckpt.COMPLETE_MARKER).write_text("not a step dir")
    assert ckpt.latest_complete(tmp_path) == ten


def test_publish_renames_then_marks_and_never_overwrites(tmp_path):
    tmp = ckpt.tmp_dir(tmp_path, 3)
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "shard.bin").write_bytes(b"\x00" * 16)
    final = ckpt.publish(tmp, tmp_path / "step_3")
    assert not tmp.exists() and ckpt.is_complete(final) and (final / "state" / "shard.bin").read_bytes() == b"\x00" * 16
    other = ckpt.tmp_dir(tmp_path, 3)
    other.mkdir()
    with pytest.raises(FileExistsError):
        ckpt.publish(other, final)


def test_trainer_state_round_trip_and_rejects_non_json(tmp_path):
    ckpt.write_trainer_state(tmp_path, step=7, world_size=2, extra_state=EXTRA_STATE)
    assert ckpt.read_trainer_state(tmp_path) == {"step": 7, "world_size": 2, "extra_state": EXTRA_STATE}
    with pytest.raises(ValueError, match="extra_state"):
        ckpt.write_trainer_state(tmp_path, step=7, world_size=1, extra_state={"bad": float("nan")})
    with pytest.raises(ValueError, match="extra_state"):
        ckpt.write_trainer_state(tmp_path, step=7, world_size=1, extra_state={"bad": object()})
    # an int key would come back as "0": a resume's lookup by 0 would find nothing, silently
    with pytest.raises(ValueError, match=r"extra_state.per_stage has the key 0 \(int\)"):
        ckpt.write_trainer_state(tmp_path, step=7, world_size=1, extra_state={"per_stage": {0: 12}})
    with pytest.raises(ValueError, match=r"extra_state.groups\[1\] has the key"):
        ckpt.write_trainer_state(tmp_path, step=7, world_size=1, extra_state={"groups": [{}, {None: 1}]})


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_rng(tmp_path, rank=0)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.load_rng(tmp_path, rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


# ---------------------------------------------------------------- resume, one rank in this process


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_resume_gives_the_uninterrupted_next_step(model_dir, batches, tmp_path, backend):
    uninterrupted = Learner(config(model_dir, backend=backend))
    uninterrupted.step(batches[0])
    # A crash during an earlier attempt at this step left a partial directory behind.
    (ckpt.tmp_dir(tmp_path, 1) / "junk").mkdir(parents=True)
    path = uninterrupted.save_checkpoint(tmp_path, extra_state=EXTRA_STATE)
    assert Path(path) == tmp_path / "step_1" == ckpt.latest_complete(tmp_path)
    assert not ckpt.tmp_dir(tmp_path, 1).exists()
    expected = uninterrupted.step(batches[1])
    expected_weights = weights(uninterrupted)

    resumed = Learner(config(model_dir, backend=backend))
    assert resumed.load_checkpoint(ckpt.latest_complete(tmp_path)) == EXTRA_STATE
    assert resumed.version == 1
    got = resumed.step(batches[1])
    # The schedule resumed rather than restarted: step index 1 of a 4-step cosine (progress 1/3: the last
    # update, index 3, runs at the floor), lr·(1 + cos(pi/3))/2.
    assert got[LR] == expected[LR] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 3)))
    for name in expected:
        if not name.endswith(("seconds", "per_second")):
            assert got[name] == expected[name], name
    got_weights = weights(resumed)
    for name, value in expected_weights.items():
        assert torch.equal(got_weights[name], value), name


def test_checkpoint_is_a_loadable_hf_model_directory(model_dir, batches, tmp_path):
    from transformers import AutoModelForImageTextToText

    from models.processor import load_processor

    learner = Learner(config(model_dir))
    learner.step(batches[0])
    path = Path(learner.save_checkpoint(tmp_path))
    state = json.loads((path / ckpt.TRAINER_STATE_FILE).read_text())
    assert state == {"step": 1, "world_size": 1, "extra_state": {}}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name
    loaded = AutoModelForImageTextToText.from_pretrained(path).state_dict()
    trained = weights(learner)
    assert set(loaded) == set(trained)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name
    assert load_processor(path).tokenizer.convert_tokens_to_ids("<|image_pad|>") == learner.model.config.image_token_id
    with pytest.raises(FileExistsError):  # a published checkpoint is never overwritten
        learner.save_checkpoint(tmp_path)


def test_a_step_renamed_but_never_marked_complete_is_written_again(model_dir, batches, tmp_path):
    """A crash between publish's rename and its COMPLETE marker: resume skips the step, and the resumed run
    (SFT's as the RL driver's) must be able to write it again, not fail on the directory left behind."""
    crashed = Learner(config(model_dir, backend="torch"))
    crashed.step(batches[0])
    path = Path(crashed.save_checkpoint(tmp_path))
    (path / ckpt.COMPLETE_MARKER).unlink()
    (path / "junk").write_text("from the crashed run")
    assert ckpt.latest_complete(tmp_path) is None

    resumed = Learner(config(model_dir, backend="torch"))
    resumed.step(batches[0])
    assert Path(resumed.save_checkpoint(tmp_path)) == path == ckpt.latest_complete(tmp_path)
    assert not (path / "junk").exists()


# ---------------------------------------------------------------- resume in a new group of processes



@pytest.mark.slow
def test_two_rank_resume_in_a_new_group(model_dir, batches, tmp_path, ray_cluster):
    from deploy.learner_group import LearnerGroup

    env = {"TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR, "DS_ACCELERATOR": "cpu"}
    cfg = config(model_dir, world_size=2)
    first = LearnerGroup(cfg, env_vars=env)
    try:
        first.step(batches[0])
        path = first.save_checkpoint(tmp_path, extra_state=EXTRA_STATE)
        expected = first.step(batches[1])
        expected_weights = assemble_state_dict(first.export_weights())[1]
    finally:
        first.shutdown()
    assert sorted(p.name for p in (Path(path) / ckpt.RNG_DIR).iterdir()) == ["rank_0.pt", "rank_1.pt"]

    second = LearnerGroup(cfg, env_vars=env)
    try:
        assert second.load_checkpoint(ckpt.latest_complete(tmp_path)) == EXTRA_STATE
        got = second.step(batches[1])
        got_weights = assemble_state_dict(second.export_weights())[1]
    finally:
        second.shutdown()
    for name in expected:
        if not name.endswith(("seconds", "per_second")):
            assert got[name] == expected[name], name
    for name, value in expected_weights.items():
        assert torch.equal(got_weights[name], value), name

    one_rank = Learner(config(model_dir))
    with pytest.raises(ValueError, match="written by 2 ranks"):
        one_rank.load_checkpoint(path)
