"""The rollout-engine contract, one suite for every installed engine (HF always; vLLM where installed).

Reference values come from an independent transformers model loaded from the same directory and run
teacher-forced (one plain forward pass over prompt + sampled tokens): the engines' behaviour
log-probs must be the log-probs of the distribution they sampled from (temperature and top-p applied).
Engines are module-scoped (a vLLM engine takes seconds to start); the weight-loading test restores the
original weights before it returns.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from actors.config import EngineConfig  # noqa: E402
from actors.engines import EngineRequest, build_engine  # noqa: E402
from actors.types import placeholder_token_ids  # noqa: E402
from actors.engines.base import FINISH_LENGTH, FINISH_REASONS, FINISH_STOP, state_dict_checksum  # noqa: E402
from actors.engines.vllm import PER_SYNC_INFO, RELOAD_LOGGER  # noqa: E402  (imports vLLM only when an engine is built)
from models.processor import load_processor  # noqa: E402

BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]
LOGPROB_TOLERANCE = 2e-3  # float32 on both sides; vLLM's CPU kernels sum in another order


@contextlib.contextmanager
def _logged(logger_name: str):
    """The messages ``logger_name`` logs meanwhile. Recorded by a filter, not a handler: vLLM (re)configures its
    loggers while it starts, dropping handlers added to them, and they do not propagate to caplog's."""
    messages: list[str] = []

    def record(log_record: logging.LogRecord) -> bool:
        messages.append(log_record.getMessage())
        return True

    logger = logging.getLogger(logger_name)
    logger.addFilter(record)
    try:
        yield messages
    finally:
        logger.removeFilter(record)


def _engine(model_dir, backend):
    # One thread for the hf engine: with other processes on the cores, OpenMP barriers stall
    # (measured: 50 tokens 10 s with 2 threads, 0.2 s with 1, under a load of 8 on 2 cores).
    options = {"cpu_threads": 1} if backend == "hf" else {"gpu_memory_utilization": 0.15}
    return build_engine(EngineConfig(backend=backend, max_model_len=1024, max_images_per_prompt=2, **options),
                        model_path=str(model_dir))


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    engine = _engine(tiny_model_dir, "hf")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_start(tiny_model_dir):
    """The vLLM engine and what its renderer logged while it started (in-process vLLM warms up then). One per
    module: closing a second in-process engine tears down the distributed state the first one uses."""
    with _logged("vllm.renderers.base") as messages:
        engine = _engine(tiny_model_dir, "vllm")
    yield engine, messages
    engine.close()


@pytest.fixture(scope="module")
def vllm_engine(vllm_start):
    return vllm_start[0]


@pytest.fixture(params=BACKENDS)
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """An independent float32 copy of the checkpoint, for teacher-forced recomputation."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _image(seed: int, width: int, height: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _request(processor, *, text: str, image) -> EngineRequest:
    """A chat prompt with one image, expanded by the HF processor itself (not by our env code)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"][0].tolist()
    return EngineRequest(prompt_ids=ids, images=[image])


@pytest.fixture(scope="module")
def requests(processor):
    # A square image (16 tokens) and a non-square one (2 x 3 cells = 6 tokens), different texts.
    return [_request(processor, text="Is there an animal?", image=_image(0, 112, 112)),
            _request(processor, text="Where is the moth?", image=_image(1, 56, 84))]


def _teacher_forced(model, processor, request: EngineRequest, tokens: list[int], *, temperature: float,
                    top_p: float) -> list[float]:
    """Log-prob of each of ``tokens`` after the prompt under log_softmax(logits / T) restricted to the
    top-p nucleus (the smallest set of most likely tokens holding at least top_p of the mass), with the
    image/video placeholder tokens excluded (engines never sample them: actors.types)."""
    image_token_id = model.config.image_token_id
    processed = processor.image_processor(images=request.images, return_tensors="pt")
    ids = torch.tensor([request.prompt_ids + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=processed["pixel_values"],
                       image_grid_thw=processed["image_grid_thw"],
                       mm_token_type_ids=(ids == image_token_id).to(torch.int32)).logits[0].float()
    logits[:, placeholder_token_ids(model.config)] = -math.inf
    start = len(request.prompt_ids)
    out = []
    for k, token in enumerate(tokens):
        step = logits[start + k - 1]
        if temperature > 0:
            step = step / temperature
        if top_p < 1.0:
            probs = torch.softmax(step, dim=-1)
            ascending, order = torch.sort(probs)
            outside = torch.cumsum(ascending, dim=0) <= 1 - top_p  # the least likely tokens left out
            outside[-1] = False
            step = step.clone()
            step[order[outside]] = -math.inf
        out.append(torch.log_softmax(step, dim=-1)[token].item())
    return out


def _greedy(engine, requests, max_tokens=16):
    return [samples[0] for samples in engine.generate(requests, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)]


def test_n_samples_per_request_with_one_finite_logprob_per_token(engine, requests):
    results = engine.generate(requests, n=3, temperature=1.0, top_p=1.0, max_tokens=[12, 7], seed=0)
    assert len(results) == 2 and all(len(samples) == 3 for samples in results)
    for samples, limit in zip(results, [12, 7]):
        for sample in samples:
            assert 1 <= len(sample.token_ids) <= limit
            assert len(sample.logprobs) == len(sample.token_ids)
            assert all(math.isfinite(lp) and lp <= 0.0 for lp in sample.logprobs)
            assert sample.finish_reason in FINISH_REASONS
            if sample.finish_reason == FINISH_LENGTH:
                assert len(sample.token_ids) == limit


def test_seeded_sampling_is_reproducible_and_seeds_matter(engine, requests):
    def tokens(seed):
        out = engine.generate(requests, n=2, temperature=1.0, top_p=1.0, max_tokens=10, seed=seed)
        return [[s.token_ids for s in samples] for samples in out]

    first = tokens(5)
    assert tokens(5) == first
    assert tokens(6) != first
    # Samples of one call differ from each other (each sequence has its own random stream).
    flat = [t for samples in first for t in samples]
    assert len({tuple(t) for t in flat}) == len(flat)
    # Unseeded calls draw afresh: a prompt asked again (a dynamic-sampling refill) gets new samples.
    assert tokens(None) != tokens(None)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_behaviour_logprobs_match_teacher_forcing(engine, requests, reference, processor, temperature, top_p):
    results = engine.generate(requests, n=2, temperature=temperature, top_p=top_p, max_tokens=12, seed=1)
    for request, samples in zip(requests, results):
        for sample in samples:
            expected = _teacher_forced(reference, processor, request, sample.token_ids,
                                       temperature=temperature, top_p=top_p)
            assert sample.logprobs == pytest.approx(expected, abs=LOGPROB_TOLERANCE)


def test_greedy_follows_the_argmax(engine, requests, reference, processor):
    for request, sample in zip(requests, _greedy(engine, requests)):
        assert sample.logprobs == pytest.approx(
            _teacher_forced(reference, processor, request, sample.token_ids, temperature=0.0, top_p=1.0),
            abs=LOGPROB_TOLERANCE)
        # Each greedy token's log-prob is the step's maximum.
        processed = processor.image_processor(images=request.images, return_tensors="pt")
        ids = torch.tensor([request.prompt_ids + sample.token_ids])
        with torch.no_grad():
            logits = reference(input_ids=ids, pixel_values=processed["pixel_values"],
                               image_grid_thw=processed["image_grid_thw"],
                               mm_token_type_ids=(ids == reference.config.image_token_id).to(torch.int32)).logits[0]
        start = len(request.prompt_ids)
        argmax = logits[start - 1:start - 1 + len(sample.token_ids)].argmax(dim=-1).tolist()
        assert sample.token_ids == argmax


@pytest.mark.vllm
def test_greedy_is_equal_between_hf_and_vllm(hf_engine, vllm_engine, requests):
    hf, vllm = _greedy(hf_engine, requests, 24), _greedy(vllm_engine, requests, 24)
    for a, b in zip(hf, vllm):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOLERANCE)
        assert a.text == b.text


def test_stop_strings_end_the_sample_right_after_the_stop_string(engine, requests, processor):
    # The random model writes "e" often: a one-character stop string is hit within a few tokens.
    results = engine.generate(requests, n=4, temperature=1.0, top_p=1.0, max_tokens=40, stop=["e"], seed=2)
    hits = 0
    for samples in results:
        for sample in samples:
            if "e" not in sample.text:
                continue
            hits += 1
            assert sample.finish_reason == FINISH_STOP
            assert sample.text.endswith("e") and sample.text.count("e") == 1
            # The last token completed the stop string: without it, no stop string yet.
            assert "e" not in processor.tokenizer.decode(sample.token_ids[:-1], skip_special_tokens=True)
    assert hits >= 4


def test_load_weights_changes_outputs_and_checksum(engine, requests, reference, processor):
    tied = reference.config.tie_word_embeddings
    original = {name: p.detach().clone() for name, p in reference.named_parameters()}
    assert engine.weights_checksum() == state_dict_checksum(reference.state_dict().items(), tie_word_embeddings=tied)
    before = _greedy(engine, requests)

    generator = torch.Generator().manual_seed(0)
    perturbed = {name: value + 0.05 * torch.randn(value.shape, generator=generator) for name, value in original.items()}
    # Half of the tensors as numpy arrays: what the Ray object store hands over zero-copy.
    names = sorted(perturbed)
    payload = [(name, perturbed[name].numpy() if k % 2 else perturbed[name]) for k, name in enumerate(names)]
    with contextlib.ExitStack() as stack:
        logged = [stack.enter_context(_logged(name)) for name in (RELOAD_LOGGER, *PER_SYNC_INFO)]
        engine.load_weights(payload, version=1)
    # vLLM warned "<layer>: Failed to load weights" for its derived buffers on every reload, and said at INFO how
    # long the reload took and that it reset the prefix cache: all filtered out (the driver times each sync).
    per_sync = ("Failed to load weights", "Reloading and processing weights took", "Successfully reset prefix cache")
    assert not [m for messages in logged for m in messages if any(text in m for text in per_sync)]
    try:
        assert engine.weight_version == 1
        assert engine.weights_checksum() == state_dict_checksum(perturbed.items(), tie_word_embeddings=tied)
        after = _greedy(engine, requests)
        assert [s.token_ids for s in after] != [s.token_ids for s in before]
        # The engine now computes with exactly the new weights (the tied output head included).
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(perturbed[name])
        for request, sample in zip(requests, after):
            assert sample.logprobs == pytest.approx(
                _teacher_forced(reference, processor, request, sample.token_ids, temperature=0.0, top_p=1.0),
                abs=LOGPROB_TOLERANCE)
        name = next(n for n in names if "q_proj.weight" in n)
        if engine.config.backend == "vllm":
            # vLLM rebuilds the fused qkv_proj from what it is sent: q alone left k and v uninitialised (NaN or
            # wrong log-probs) under a checksum that matched. Refused, and nothing changed.
            with pytest.raises(ValueError, match="takes a complete set of weights \\(1 missing"):
                engine.load_weights([(n, v) for n, v in payload if n != name], version=2)
            with pytest.raises(ValueError, match="complete set"):
                engine.load_weights([(name, original[name])], version=2)
            assert engine.weight_version == 1
            assert engine.weights_checksum() == state_dict_checksum(perturbed.items(), tie_word_embeddings=tied)
            assert [s.logprobs for s in _greedy(engine, requests)] == [s.logprobs for s in after]
        else:  # a partial set replaces only the weights it names; the checksum still covers every weight held
            engine.load_weights([(name, original[name])], version=2)
            mixed = {**perturbed, name: original[name]}
            assert engine.weights_checksum() == state_dict_checksum(mixed.items(), tie_word_embeddings=tied)
    finally:
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(original[name])
        engine.load_weights(original.items(), version=3)
    assert engine.weights_checksum() == state_dict_checksum(original.items(), tie_word_embeddings=tied)
    assert [s.token_ids for s in _greedy(engine, requests)] == [s.token_ids for s in before]


@pytest.mark.vllm
def test_vllm_starts_with_its_multimodal_warm_up_done(vllm_start):
    """Its warm-up runs the processor on a dummy image and, unless videos are limited to 0, a dummy video, which
    our image-only processor refuses: it failed (a warning), and the first request paid for the processor."""
    _, messages = vllm_start
    assert any("Multi-modal warmup completed" in m for m in messages), messages
    assert not any("warmup failed" in m for m in messages)


def test_load_weights_rejects_unknown_names(hf_engine):
    with pytest.raises(ValueError, match="unknown weight 'module.lm_head.weight'"):
        hf_engine.load_weights([("module.lm_head.weight", torch.zeros(1))], version=9)
    assert hf_engine.weight_version != 9


def test_checksum_ignores_order_and_the_tied_alias_but_not_values():
    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(4)
    base = state_dict_checksum([("x", a), ("y", b)], tie_word_embeddings=True)
    assert state_dict_checksum([("y", b), ("x", a)], tie_word_embeddings=True) == base
    assert state_dict_checksum([("x", a), ("y", b), ("lm_head.weight", a)], tie_word_embeddings=True) == base
    assert state_dict_checksum([("x", a), ("y", b), ("lm_head.weight", a)], tie_word_embeddings=False) != base
    changed = a.clone()
    changed[1, 2] += 1e-6
    assert state_dict_checksum([("x", changed), ("y", b)], tie_word_embeddings=True) != base
    assert state_dict_checksum([("x", a.reshape(3, 2)), ("y", b)], tie_word_embeddings=True) != base


def test_foundation_tiny_model_samples_a_synthetic_image_and_reloads_with_auto_classes(engine, tiny_model_dir,
                                                                                      processor):
    """The embedded model end to end: a synthetic camouflage image, 4 sampled completions, and the
    directory read back by transformers' Auto classes with the same weights, template and image size."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from data.synth import generate_sample

    scene = generate_sample(np.random.default_rng(0), image_size=112, difficulty=0.3, category="moth")
    image = Image.fromarray(scene.image)
    request = _request(processor, text="Is there a camouflaged animal in this image?", image=image)
    samples = engine.generate([request], n=4, temperature=1.0, top_p=1.0, max_tokens=16, seed=0)[0]
    assert len(samples) == 4 and all(1 <= len(s.token_ids) <= 16 for s in samples)
    assert len({tuple(s.token_ids) for s in samples}) == 4

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    image_processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    assert engine.weights_checksum() == state_dict_checksum(
        model.state_dict().items(), tie_word_embeddings=model.config.tie_word_embeddings)
    assert tokenizer.chat_template and "<|image_pad|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False)
    grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # 112 px = 8 patches of 14 a side, merged 2x2: 16 image tokens
    assert request.prompt_ids.count(model.config.image_token_id) == 16


def test_placeholder_tokens_are_never_sampled(engine, reference, requests):
    """A random model puts mass on <|image_pad|> & co.; sampling one would break the learner's forward."""
    banned = set(placeholder_token_ids(reference.config))
    samples = engine.generate(requests, n=16, temperature=1.5, top_p=1.0, max_tokens=48, seed=3)
    sampled = {token for per_request in samples for sample in per_request for token in sample.token_ids}
    assert len(sampled) > 50  # the test draws widely enough to have hit them otherwise
    assert not (sampled & banned)
