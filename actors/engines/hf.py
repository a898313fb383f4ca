"""Rollout engine on Hugging Face ``generate`` (CPU or one CUDA device).

Sampling is done by our own logits-processor chain, not by ``generate``'s warpers: transformers puts
user processors BEFORE its temperature/top-p warpers, so recording the log-prob of the sampling
distribution needs the warpers in our chain (generation config: temperature 1, top_p 1, top_k 0, so
``generate`` adds none). The recorder keeps one step of log-probs ([B, V]) at a time, not all scores:
with Qwen's 151k vocabulary, ``output_scores`` of 64 sequences x 512 steps would be about 20 GB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from actors.config import EngineConfig
from actors.types import placeholder_token_ids
from actors.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineRequest,
    EngineSample,
    RolloutEngine,
    as_torch,
    check_generate_args,
    collapse_image_pads,
    eos_token_ids,
    state_dict_checksum,
    ties_word_embeddings,
    truncate_at_stop,
)
from models.processor import load_processor

log = logging.getLogger(__name__)


class _ChosenTokenLogprobs(LogitsProcessor):
    """Last processor of the chain: records log_softmax(processed scores) of each step's chosen token.

    At step t the chosen token of step t-1 is the last column of ``input_ids``; the final step's token
    is read from the finished sequences in ``finish``.
    """

    def __init__(self):
        self._previous: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._previous is not None:
            self._steps.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self._previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, T] float32 log-probs of the T generated tokens."""
        if self._previous is not None:
            self._steps.append(self._previous.gather(1, sequences[:, -1:]).squeeze(1))
            self._previous = None
        return torch.stack(self._steps, dim=1)


class HFEngine(RolloutEngine):
    """``RolloutEngine`` on a transformers Qwen2.5-VL model."""

    def __init__(self, config: EngineConfig, *, model_path: str):
        self.config = config
        self.model_path = str(model_path)
        if config.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = config.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("engine.device is 'cuda' but no CUDA device is visible")
        self.device = torch.device(device)
        if config.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads)
        self.dtype = getattr(torch, config.dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.processor = load_processor(self.model_path)
        self.tokenizer = self.processor.tokenizer
        self.eos_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.image_pad_id = self.model.config.image_token_id
        self.placeholder_ids = placeholder_token_ids(self.model.config)
        self.merge_size = self.processor.image_processor.merge_size
        self.tied = ties_word_embeddings(self.model.config)
        # A clean generation config: a real checkpoint's generation_config.json (Qwen's sets top_k=1,
        # top_p=0.001, repetition_penalty=1.05) would otherwise fill in every option we leave unset.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        self._version = 0
        log.info("hf engine: %s on %s (%s)", self.model_path, self.device, config.dtype)

    @property
    def weight_version(self) -> int:
        return self._version

    @torch.no_grad()
    def generate(self, requests: Sequence[EngineRequest], *, n: int, temperature: float, top_p: float,
                 max_tokens: int | Sequence[int], stop: Sequence[str] = (),
                 seed: int | None = None) -> list[list[EngineSample]]:
        limits = check_generate_args(requests, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        if not requests:
            return []
        per_call = max(1, self.config.max_batch_sequences // n)
        results: list[list[EngineSample]] = []
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # A private RNG stream: seeding must not disturb (or depend on) the caller's torch RNG. Unseeded, the
        # stream starts from fresh entropy: fork_rng puts the state back on exit, so without a reseed every
        # unseeded call would draw the same numbers (a dynamic-sampling refill would return the same group).
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            else:
                torch.seed()
            for start in range(0, len(requests), per_call):
                chunk = slice(start, start + per_call)
                results += self._generate_chunk(requests[chunk], limits=limits[chunk], n=n, temperature=temperature,
                                                top_p=top_p, stop=stop)
        return results

    def _encode(self, requests: Sequence[EngineRequest]) -> dict[str, torch.Tensor]:
        """Left-padded batch with each request's images; checks pad runs against the processor's grids."""
        images = [image for request in requests for image in request.images]
        batch: dict[str, torch.Tensor] = {}
        tokens_per_image: list[int] = []
        if images:
            processed = self.processor.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = processed["pixel_values"].to(self.device, self.dtype)
            batch["image_grid_thw"] = processed["image_grid_thw"].to(self.device)
            tokens_per_image = (processed["image_grid_thw"].prod(dim=1) // self.merge_size**2).tolist()
        offset = 0
        for i, request in enumerate(requests):
            _, runs = collapse_image_pads(request.prompt_ids, image_pad_id=self.image_pad_id)
            expected = tokens_per_image[offset:offset + len(request.images)]
            offset += len(request.images)
            if runs != expected:
                raise ValueError(f"request {i}: image pad runs {runs} do not match its {len(request.images)} "
                                 f"image(s), which the processor turns into {expected} tokens")
        length = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), length), dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, length - len(request.prompt_ids):] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[row, length - len(request.prompt_ids):] = 1
        batch["input_ids"] = input_ids.to(self.device)
        batch["attention_mask"] = attention_mask.to(self.device)
        # transformers 5 computes Qwen's 3-D (mrope) positions only when told where the image tokens are.
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_pad_id).to(torch.int32)
        return batch

    def _generate_chunk(self, requests: Sequence[EngineRequest], *, limits: list[int], n: int, temperature: float,
                        top_p: float, stop: Sequence[str]) -> list[list[EngineSample]]:
        batch = self._encode(requests)
        recorder = _ChosenTokenLogprobs()
        chain = LogitsProcessorList([SuppressTokensLogitsProcessor(self.placeholder_ids, device=self.device)])
        if temperature > 0.0:
            if temperature != 1.0:
                chain.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                chain.append(TopPLogitsWarper(top_p))
        chain.append(recorder)
        options = dict(max_new_tokens=max(limits), num_return_sequences=n, eos_token_id=self.eos_ids,
                       pad_token_id=self.pad_id, stop_strings=list(stop) or None)
        if temperature > 0.0:
            # Neutral settings, so that generate adds no warper of its own after our recorder.
            options.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        sequences = self.model.generate(
            **batch, generation_config=GenerationConfig(**options), logits_processor=chain,
            tokenizer=self.tokenizer if stop else None,
        )
        prompt_length = batch["input_ids"].shape[1]
        generated = sequences[:, prompt_length:].cpu()
        logprobs = recorder.finish(sequences).cpu()
        if logprobs.shape != generated.shape:
            raise RuntimeError(f"recorded {tuple(logprobs.shape)} log-probs for {tuple(generated.shape)} tokens")
        out = []
        for i, limit in enumerate(limits):
            rows = range(i * n, (i + 1) * n)
            out.append([self._sample(generated[r, :limit].tolist(), logprobs[r, :limit].tolist(), stop, limit)
                        for r in rows])
        return out

    def _sample(self, tokens: list[int], logprobs: list[float], stop: Sequence[str], limit: int) -> EngineSample:
        """Cut a padded row after its end: the first eos token or the token completing a stop string."""
        finish = FINISH_LENGTH
        end = next((k + 1 for k, t in enumerate(tokens) if t in self.eos_ids), None)
        if end is not None:
            tokens, finish = tokens[:end], FINISH_STOP
        text, hit = truncate_at_stop(self._decode(tokens), stop)
        if hit is not None:
            # The fewest tokens whose text holds the stop string (the text only grows with k).
            low, high = 1, len(tokens)
            while low < high:
                mid = (low + high) // 2
                if hit in self._decode(tokens[:mid]):
                    high = mid
                else:
                    low = mid + 1
            tokens, finish = tokens[:low], FINISH_STOP
        if finish == FINISH_LENGTH and len(tokens) < limit:
            raise RuntimeError(f"a sample ended after {len(tokens)} < {limit} tokens without eos or stop string")
        return EngineSample(token_ids=tokens, logprobs=logprobs[:len(tokens)], text=text, finish_reason=finish)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, object]], *, version: int) -> None:
        # keep_vars: the live parameters, including the tied head under its own name.
        targets = self.model.state_dict(keep_vars=True)
        destinations, sources = [], []
        for name, value in named_tensors:  # every name and shape checked before any weight changes
            target = targets.get(name)
            if target is None:
                raise ValueError(f"load_weights: unknown weight {name!r} (names must be the HF state dict's)")
            tensor = as_torch(value)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model {tuple(target.shape)}")
            destinations.append(target.data)
            sources.append(tensor.to(device=self.device, dtype=target.dtype))
        # One fused copy: measured on the small model (105 tensors, 43 MB), 5.4 ms against 8-10 ms for
        # a copy_ per tensor (load_state_dict: 8 ms).
        torch._foreach_copy_(destinations, sources)
        self._version = version

    def weights_checksum(self) -> str:
        return state_dict_checksum(self.model.state_dict().items(), tie_word_embeddings=self.tied)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
