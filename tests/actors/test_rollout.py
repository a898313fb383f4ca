"""RolloutWorker on real engines (HF always, vLLM where installed) and the tiny model.

The boundary test hands the worker's trajectory groups to the learner's own collation and forward
pass: the learner must see the same image tokens the rollout built and recompute the behaviour
log-probs, which is what makes the importance ratio start at 1.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from actors.config import RolloutConfig  # noqa: E402
from actors.engines.base import FINISH_LENGTH, FINISH_STOP  # noqa: E402
from actors.rollout import (  # noqa: E402
    STAT_GROUPS,
    STAT_SAMPLES,
    STAT_TOKENS,
    STAT_TURNS,
    STAT_WEIGHT_VERSION,
    TIMING_ENV,
    TIMING_GENERATE,
    RolloutWorker,
)
from actors.types import PromptGroup, Target  # noqa: E402

N, MAX_TOKENS = 3, 12
BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]


def _config(model_dir, backend, *, seed=11) -> RolloutConfig:
    engine = {"backend": backend, "max_model_len": 2048}
    engine.update({"cpu_threads": 1} if backend == "hf" else {"gpu_memory_utilization": 0.15})
    sampling = {"n": N, "max_tokens": MAX_TOKENS, "seed": seed}
    return RolloutConfig.model_validate({"engine": engine, "sampling": sampling})


@pytest.fixture(scope="module", params=BACKENDS)
def worker(request, tiny_model_dir):
    worker = RolloutWorker(config=_config(tiny_model_dir, request.param), model_path=str(tiny_model_dir),
                           worker_id=f"{request.param}-0")
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _prompts() -> list[PromptGroup]:
    from PIL import Image

    prompts = []
    for i, (width, height) in enumerate([(112, 112), (140, 84)]):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        prompts.append(PromptGroup(group_id=f"g{i}#0", prompt_id=f"p{i}", task="camo", difficulty="easy",
                                   question="Is there a camouflaged animal in this image?", image=buffer.getvalue(),
                                   target=Target(present=False, category=None, boxes=[], width=width, height=height),
                                   stage=1))
    return prompts


def test_groups_hold_n_single_turn_trajectories(worker):
    before = worker.stats()
    groups = worker.generate_groups(_prompts())
    assert [g.group_id for g in groups] == ["g0#0", "g1#0"]
    tokens = 0
    for group in groups:
        assert group.policy_version == worker.weight_version and group.worker_id == worker.worker_id
        assert group.stage == 1 and set(group.timings) == {TIMING_GENERATE, TIMING_ENV}
        assert group.timings[TIMING_GENERATE] > 0
        assert len(group.trajectories) == N
        assert [t.sample_index for t in group.trajectories] == list(range(N))
        assert len({tuple(t.prompt_ids) for t in group.trajectories}) == 1
        for t in group.trajectories:
            assert 1 <= len(t.completion_ids) <= MAX_TOKENS
            assert len(t.behaviour_logprobs) == len(t.loss_mask) == len(t.completion_ids)
            assert set(t.loss_mask) == {1} and all(lp <= 0 for lp in t.behaviour_logprobs)
            assert t.zoom_images == [] and t.zoom_boxes == []
            assert t.finish_reason in (FINISH_STOP, FINISH_LENGTH)
            assert (t.finish_reason == FINISH_LENGTH) == (len(t.completion_ids) == MAX_TOKENS)
            tokens += len(t.completion_ids)
    after = worker.stats()
    assert after[STAT_GROUPS] - before.get(STAT_GROUPS, 0) == 2
    assert after[STAT_SAMPLES] - before.get(STAT_SAMPLES, 0) == 2 * N
    assert after[STAT_TURNS] - before.get(STAT_TURNS, 0) == 2 * N
    assert after[STAT_TOKENS] - before.get(STAT_TOKENS, 0) == tokens


def test_the_learner_recomputes_the_behaviour_logprobs(worker, reference):
    from learner.batch import collate
    from learner.forward import sequence_logprobs

    groups = worker.generate_groups(_prompts())
    batch = collate(groups, image_processor=worker.env.processor.image_processor,
                    pad_token_id=worker.env.tokenizer.pad_token_id, advantages=[[0.0] * N for _ in groups])
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(reference, batch)  # also checks image pads per row
    mask = batch.completion_mask.bool()
    assert torch.allclose(logprobs[mask], batch.old_logprobs[mask], atol=2e-3)


def test_seeded_worker_calls_are_reproducible_successive_calls_differ_and_workers_differ(worker, tiny_model_dir):
    def new_worker(worker_id):  # same engine, fresh call counter
        return RolloutWorker(config=worker.config, model_path=str(tiny_model_dir), worker_id=worker_id,
                             engine=worker.engine)

    first_worker = new_worker("rollout-0")
    first = first_worker.generate_groups(_prompts())
    second = first_worker.generate_groups(_prompts())
    again = new_worker("rollout-0").generate_groups(_prompts())  # a worker of that name started over (a resume)
    other = new_worker("rollout-1").generate_groups(_prompts())  # another worker's first call

    def ids(groups):
        return [t.completion_ids for g in groups for t in g.trajectories]

    assert ids(again) == ids(first)
    assert ids(second) != ids(first)
    assert ids(other) != ids(first)


def test_load_weights_bumps_the_policy_version(worker, reference):
    from actors.engines.base import state_dict_checksum

    version = worker.weight_version
    weights = [(name, p.detach().clone()) for name, p in reference.named_parameters()]
    worker.load_weights(weights, version=version + 1)
    assert worker.weight_version == version + 1
    assert worker.stats()[STAT_WEIGHT_VERSION] == version + 1
    assert worker.weights_checksum() == state_dict_checksum(weights, tie_word_embeddings=True)
    assert all(g.policy_version == version + 1 for g in worker.generate_groups(_prompts()))


@pytest.mark.parametrize("change, message", [
    ({"env": {"max_turns": 2}}, "prompt.allow_zoom"),
    ({"prompt": {"allow_zoom": True}}, "prompt.allow_zoom"),
    ({"env": {"max_turns": 5}, "prompt": {"allow_zoom": True}}, "engine.max_images_per_prompt"),
    ({"env": {"max_completion_tokens": 4096}}, "engine.max_model_len"),
    ({"sampling": {"temperature": 0.0}}, "n=4 samples identical"),
    ({"engine": {"tensor_parallel_size": 2}}, "tensor_parallel_size > 1 needs backend 'vllm'"),
    ({"engine": {"backend": "vllm", "cpu_threads": 2}}, "cpu_threads applies to the hf engine"),
    ({"sampling": {"top_p": 0.0}}, "top_p"),
    ({"env": {"zoom": True}}, "zoom"),  # unknown fields are errors, not ignored
])
def test_config_errors_name_the_field(change, message):
    from pydantic import ValidationError

    data = {"engine": {}, "sampling": {}, "env": {}, "prompt": {}}
    for section, values in change.items():
        data[section].update(values)
    with pytest.raises(ValidationError, match=message):
        RolloutConfig.model_validate(data)
