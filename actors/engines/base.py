"""The rollout-engine contract that every inference backend (HF, vLLM) implements.

A request is a token sequence, not text: in a multi-turn rollout the next turn continues from the
exact tokens the model sampled plus the environment's tokens, and re-tokenizing decoded text would
not give them back. ``EngineRequest.prompt_ids`` is in the layout the learner trains on: chat-
templated, with each image's ``<|image_pad|>`` run EXPANDED to one pad per merged 28x28 cell of the
processor-resized image. ``images`` are in the order of their pad runs. Each engine turns that into
what its backend wants and checks that its backend sees the same number of image tokens.

Behaviour log-probs: ``EngineSample.logprobs[i]`` is the log-probability of ``token_ids[i]`` under
the distribution the token was ACTUALLY sampled from: log_softmax(logits / temperature), renormalised
over the top-p nucleus when top_p < 1. With temperature 0 (greedy) it is log_softmax(logits). At the
default temperature 1 and top_p 1 this is the model's own log-prob, which the learner recomputes; a
learner that trains a run sampled at another temperature must divide its logits by it as well.
Both engines follow this convention (vLLM: ``logprobs_mode="processed_logprobs"``).

Generated tokens include the end-of-sequence token when the model emitted one (it is trained on: the
model learns to stop). ``text`` is the decoded text without special tokens; when a stop string ended
the sample, ``text`` ends with that stop string (included) and ``token_ids`` end with the token that
completed it.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

FINISH_STOP = "stop"  # end-of-sequence token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH)

# With tied embeddings the output head IS the input embedding; state dicts list it under both names.
TIED_HEAD_NAME = "lm_head.weight"


@dataclass(frozen=True)
class EngineRequest:
    """One prompt for ``RolloutEngine.generate``; see the module docstring for the token layout."""

    prompt_ids: list[int]
    images: list[Any] = field(default_factory=list)  # PIL images, in the order of their pad runs


@dataclass(frozen=True)
class EngineSample:
    """One generated continuation of a request."""

    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each token, <= 0, len == len(token_ids)
    text: str
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH


class RolloutEngine(abc.ABC):
    """An inference backend holding one version of the policy weights."""

    @abc.abstractmethod
    def generate(
        self,
        requests: Sequence[EngineRequest],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int | Sequence[int],
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[EngineSample]]:
        """``n`` samples for each request, in request order: result[i][j] is sample j of request i.

        ``max_tokens`` is one limit for all requests or one per request. A ``seed`` makes the call
        reproducible on the same engine with the same requests (different requests of one call get
        different random streams, so equal prompts do not give equal samples).
        """

    @abc.abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Any]], *, version: int) -> None:
        """Replace the weights in place (names as the HF state dict has them); then ``weight_version`` == version.

        Tensors may be torch tensors or numpy arrays (the Ray object store hands numpy over zero-copy).
        A partial set updates only the named weights in the HF engine; the vLLM engine refuses one (ValueError,
        nothing changed): its reload rebuilds whole fused layers. The learner always sends a complete set.
        """

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights held (0 = as loaded from the checkpoint directory)."""

    @abc.abstractmethod
    def weights_checksum(self) -> str:
        """``state_dict_checksum`` of the weights held, under HF state-dict names, in the engine's dtype."""

    def close(self) -> None:
        """Release the backend's memory and threads. The engine is unusable afterwards."""


def check_generate_args(requests: Sequence[EngineRequest], *, n: int, temperature: float, top_p: float,
                        max_tokens: int | Sequence[int]) -> list[int]:
    """Validate ``generate`` arguments the same way in every engine; returns max_tokens per request."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    limits = [max_tokens] * len(requests) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(requests):
        raise ValueError(f"max_tokens has {len(limits)} entries for {len(requests)} requests")
    if any(limit < 1 for limit in limits):
        raise ValueError(f"max_tokens must be >= 1, got {min(limits)}")
    for i, request in enumerate(requests):
        if not request.prompt_ids:
            raise ValueError(f"request {i}: empty prompt_ids")
    return limits


def as_torch(value):
    """A torch tensor for a torch tensor or a numpy array (zero-copy where possible)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(value)


class WeightsChecksum:
    """Incremental ``state_dict_checksum``: feed weights as they stream past, read the digest at the end."""

    def __init__(self, *, tie_word_embeddings: bool, dtype=None):
        self._tied = tie_word_embeddings
        self._dtype = dtype
        self._digests: dict[str, str] = {}

    def add(self, name: str, value) -> None:
        import torch

        if self._tied and name == TIED_HEAD_NAME:
            return
        if name in self._digests:
            raise ValueError(f"weight {name!r} given twice")
        tensor = as_torch(value).detach()
        if self._dtype is not None and tensor.is_floating_point():  # an engine keeps integer buffers as they are
            tensor = tensor.to(self._dtype)
        tensor = tensor.cpu().contiguous()
        h = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._digests[name] = h.hexdigest()

    @classmethod
    def of(cls, named_tensors: Iterable[tuple[str, Any]], *, tie_word_embeddings: bool, dtype=None) -> WeightsChecksum:
        """The hashes of ``named_tensors`` (see ``state_dict_checksum``)."""
        checksum = cls(tie_word_embeddings=tie_word_embeddings, dtype=dtype)
        for name, value in named_tensors:
            checksum.add(name, value)
        return checksum

    def update(self, later: WeightsChecksum) -> None:
        """Take in the weights ``later`` hashed, replacing those of the same names (a partial reload)."""
        self._digests.update(later._digests)

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for name in sorted(self._digests):
            total.update(f"{name}={self._digests[name]};".encode())
        return total.hexdigest()


def state_dict_checksum(named_tensors: Iterable[tuple[str, Any]], *, tie_word_embeddings: bool, dtype=None) -> str:
    """A deterministic hash of named weights, independent of their order.

    Each tensor is hashed as name, dtype, shape and raw bytes, a floating one cast to ``dtype`` first when
    given (so a float32 source can be compared with a bfloat16 engine). With tied embeddings ``lm_head.weight`` is
    an alias of the embedding and is skipped, so a state dict and ``named_parameters()`` hash alike.
    """
    return WeightsChecksum.of(named_tensors, tie_word_embeddings=tie_word_embeddings, dtype=dtype).hexdigest()


def ties_word_embeddings(hf_config) -> bool:
    """Whether a transformers model config ties the output head to the input embedding."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return bool(getattr(hf_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def eos_token_ids(model_dir, tokenizer) -> list[int]:
    """Token ids that end a sample: the checkpoint's generation_config.json eos ids plus the tokenizer's."""
    import json
    from pathlib import Path

    ids: list[int] = []
    path = Path(model_dir) / "generation_config.json"
    if path.exists():
        value = json.loads(path.read_text()).get("eos_token_id")
        ids = [value] if isinstance(value, int) else list(value or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"{model_dir}: no eos_token_id in generation_config.json or the tokenizer")
    return ids


def collapse_image_pads(prompt_ids: Sequence[int], *, image_pad_id: int) -> tuple[list[int], list[int]]:
    """Each run of consecutive image pads → one pad (the form chat templates write); also returns the run lengths."""
    collapsed: list[int] = []
    runs: list[int] = []
    previous_pad = False
    for token in prompt_ids:
        is_pad = token == image_pad_id
        if is_pad and previous_pad:
            runs[-1] += 1
        else:
            collapsed.append(token)
            if is_pad:
                runs.append(1)
        previous_pad = is_pad
    return collapsed, runs


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` cut right after the earliest occurrence of any stop string (kept), and that string."""
    best, best_end = None, None
    for s in stop:
        at = text.find(s)
        if at >= 0 and (best_end is None or at + len(s) < best_end):
            best, best_end = s, at + len(s)
    if best is None:
        return text, None
    return text[:best_end], best
