"""Full policy weights out of the learner: a versioned, bucketed stream, and an HF directory from it.

Under ZeRO-3 every rank holds a 1/world slice of each parameter. ``export_weights`` gathers them
bucket by bucket with ``deepspeed.zero.GatheredParameters`` — a COLLECTIVE: every rank must run the
generator to its end, in step. Rank 0 receives the buckets; on other ranks the generator yields
nothing (it only takes part in the gathers). Memory on rank 0 is bounded by one bucket.

Names are exactly the keys of a freshly built model's ``state_dict()`` (e.g.
``model.language_model.layers.0.mlp.up_proj.weight``): ``load_state_dict(strict=True)`` accepts them,
and vLLM's Qwen2.5-VL loader maps them (``model.language_model.`` / ``model.visual.`` / ``lm_head.``).
Non-persistent buffers (the rotary ``inv_freq``) are not in ``state_dict()`` and are not exported;
a fresh model computes its own. Tied weights (``lm_head`` = ``embed_tokens``) are gathered once and
exported under both names, as ``state_dict()`` lists them. A LoRA policy is exported MERGED
(W + alpha/r · B·A under the base model's names), which is what an inference engine loads.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.weights import packed_offsets
from learner.checkpoint import RESUMABLE_STATE
from models.records import PROVENANCE_FILES

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 2**20
# Files of a model directory that hold weights: replaced by the export, never copied from the source.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Written by save_pretrained from the model itself; the source's copies would be stale duplicates.
MODEL_WRITTEN_FILES = ("config.json", "generation_config.json")
PEFT_PREFIX = "base_model.model."


@dataclass
class WeightBucket:
    """A slice of one weights version: ``tensors`` are (state_dict name, CPU tensor) pairs.

    Buckets of one version arrive with index 0, 1, ... and exactly the last has ``is_last``; a
    receiver applies the version only once it has them all. ``flat``, when set, is a uint8 buffer
    every tensor is a view of, in order, at ``actors.weights.packed_offsets`` (``export_weights`` lays
    buckets out so): a transport sends it as one block without a copy.
    """

    version: int
    index: int
    is_last: bool
    tensors: list[tuple[str, torch.Tensor]]
    flat: torch.Tensor | None = None

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors)

    def __reduce__(self):
        # Pickling a view of a tensor pickles its WHOLE storage: a flat bucket would cross Ray (the
        # learner actors' export stream) once per tensor. Send the flat buffer once, as numpy (which
        # Ray passes zero-copy), and rebuild the views from it.
        if self.flat is None:
            return (WeightBucket, (self.version, self.index, self.is_last, self.tensors))
        layout = [(name, t.dtype, tuple(t.shape), t.data_ptr() - self.flat.data_ptr()) for name, t in self.tensors]
        return (_flat_bucket, (self.version, self.index, self.is_last, layout, self.flat.numpy()))


@dataclass
class _Entry:
    """One exported tensor: its names (several when tied) and the tensors it is computed from."""

    names: list[str]
    sources: list[torch.Tensor]  # [tensor] or, for LoRA, [base weight, lora_A, lora_B]
    lora_scaling: float | None = None

    @property
    def num_bytes(self) -> int:
        """Bytes it takes in a bucket: a copy per name (tied weights are sent under each name)."""
        base = self.sources[0]
        return int(getattr(base, "ds_numel", base.numel())) * base.element_size() * len(self.names)


def _unwrap(engine_or_model) -> torch.nn.Module:
    """The Hugging Face module inside a DeepSpeed engine (or the module itself)."""
    inner = getattr(engine_or_model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else engine_or_model


def _is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _lora_layers(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight state_dict name: (lora_A weight, lora_B weight, scaling)} of a peft LoRA model."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if len(module.active_adapters) != 1:
            raise ValueError(f"{name}: exporting a merged model needs exactly one active adapter")
        adapter = module.active_adapters[0]
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{name}: fan_in_fan_out LoRA layers are not supported by the export")
        layers[f"{name}.base_layer.weight"] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                               float(module.scaling[adapter]))
    return layers


def _export_name(name: str) -> str:
    """state_dict name of a peft-wrapped model -> the name in the plain model's state_dict."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def _entries(model: torch.nn.Module) -> list[_Entry]:
    lora = _lora_layers(model)
    entries: dict[int, _Entry] = {}  # by tensor identity: tied weights share one entry
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name:
            continue  # folded into its base weight below
        if id(tensor) in entries:
            entries[id(tensor)].names.append(_export_name(name))
            continue
        if name in lora:
            lora_a, lora_b, scaling = lora[name]
            entries[id(tensor)] = _Entry([_export_name(name)], [tensor, lora_a, lora_b], scaling)
        else:
            entries[id(tensor)] = _Entry([_export_name(name)], [tensor])
    return list(entries.values())


def _plan(entries: list[_Entry], bucket_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries grouped so that each bucket stays within bucket_bytes (or holds one entry)."""
    buckets, current, size = [], [], 0
    for entry in entries:
        if current and size + entry.num_bytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.num_bytes
    if current:
        buckets.append(current)
    return buckets


def _flat_bucket(version: int, index: int, is_last: bool, layout: list, flat) -> WeightBucket:
    """``WeightBucket.__reduce__``'s inverse: views of ``flat`` (a numpy uint8 array) at their offsets."""
    import warnings

    with warnings.catch_warnings():  # Ray hands back read-only arrays; the tensors are only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        flat = torch.from_numpy(flat)
    tensors = [(name, _view(flat, offset, dtype, shape)) for name, dtype, shape, offset in layout]
    return WeightBucket(version, index, is_last, tensors, flat=flat)


def _view(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    size = int(torch.Size(shape).numel()) * dtype.itemsize
    if size == 0:  # an empty slice has no address to view
        return torch.empty(shape, dtype=dtype)
    return flat[offset:offset + size].view(dtype).view(shape)


def _materialise(entry: _Entry) -> torch.Tensor:
    """The full exported tensor of an entry (its sources are gathered), where it lives (no copy if plain)."""
    base = entry.sources[0].detach()
    if entry.lora_scaling is None:
        return base
    lora_a, lora_b = (s.detach().float() for s in entry.sources[1:])
    merged = base.float() + entry.lora_scaling * (lora_b @ lora_a)
    return merged.to(base.dtype)


def _flat_copy(bucket: list[_Entry]) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """Copy a bucket's (gathered) tensors into one fresh CPU uint8 buffer: the buffer and the named views.

    Tied names get a copy each, as ``state_dict()`` lists them (a receiver loads them by name).
    """
    named = []
    for entry in bucket:
        full = _materialise(entry)  # computed once for all names of tied weights
        named.extend((name, full) for name in entry.names)
    # The weight transports' packed layout (actors.weights), so they send the buffer itself as one chunk.
    offsets, total = packed_offsets([t.numel() * t.element_size() for _, t in named])
    flat = torch.empty(total, dtype=torch.uint8)
    views = []
    for (name, full), offset in zip(named, offsets):
        view = _view(flat, offset, full.dtype, tuple(full.shape))
        view.copy_(full)  # the one copy out of the model (a device-to-host copy on GPU)
        views.append((name, view))
    return flat, views


def export_weights(engine_or_model, *, version: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[WeightBucket]:
    """Stream the full weights of ``engine_or_model`` as ``WeightBucket``s tagged with ``version``.

    Args:
        engine_or_model: a DeepSpeed engine or the (possibly ZeRO-3 partitioned, possibly peft) model.
        version: the policy version these weights are (the learner's optimiser step count).
        bucket_bytes: target bucket size; one tensor larger than this makes a bucket of its own.

    Collective under ZeRO-3: call on EVERY rank and exhaust the iterator on every rank. Yields on
    rank 0 only. After forward-only passes (generation), release prefetched parameters first
    (``engine.optimizer.empty_partition_cache()``; ``Learner`` does it) or the gathers fail on params in flight.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    model = _unwrap(engine_or_model)
    plan = _plan(_entries(model), bucket_bytes)
    is_receiver = _rank() == 0
    for index, bucket in enumerate(plan):
        to_gather = [s for entry in bucket for s in entry.sources if _is_partitioned(s)]
        gathered = nullcontext()
        if to_gather:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None)
        with gathered:
            if is_receiver:
                flat, tensors = _flat_copy(bucket)
        if is_receiver:
            yield WeightBucket(version=version, index=index, is_last=index == len(plan) - 1, tensors=tensors,
                               flat=flat)


def assemble_state_dict(buckets: Iterable[WeightBucket]) -> tuple[int, dict[str, torch.Tensor]]:
    """(version, state dict) of a complete bucket stream; raises ValueError on a gap, mix or cut-off."""
    version, state, expected = None, {}, 0
    last_seen = False
    for bucket in buckets:
        if last_seen:
            raise ValueError(f"bucket {bucket.index} arrived after the last bucket")
        if version is None:
            version = bucket.version
        if bucket.version != version:
            raise ValueError(f"bucket {bucket.index} has version {bucket.version}, expected {version}")
        if bucket.index != expected:
            raise ValueError(f"bucket index {bucket.index} arrived, expected {expected}")
        for name, tensor in bucket.tensors:
            if name in state:
                raise ValueError(f"tensor {name!r} appears twice in version {version}")
            state[name] = tensor
        expected += 1
        last_seen = bucket.is_last
    if version is None:
        raise ValueError("no weight buckets")
    if not last_seen:
        raise ValueError(f"version {version} is incomplete: {expected} buckets and none marked last")
    return version, state


def load_buckets(model: torch.nn.Module, buckets: Iterable[WeightBucket]) -> int:
    """Load a complete bucket stream into a plain model (strict); returns the version loaded."""
    version, state = assemble_state_dict(buckets)
    model.load_state_dict(state, strict=True)
    return version


def copy_model_files(source_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the non-weight files of a model directory (tokenizer, processor, chat template, ...), not the
    records of a checkpoint it may be nor those of how it was made (``models.records``)."""
    source, out = Path(source_dir), Path(out_dir)
    copied = []
    for path in sorted(source.iterdir()):
        # A model exported from <sft>/checkpoints/step_N (RL or eval starting there) is a plain model, not that
        # checkpoint, nor the model it was made from.
        if not path.is_file() or path.name in (*WEIGHT_INDEX_FILES, *MODEL_WRITTEN_FILES, *RESUMABLE_STATE,
                                               *PROVENANCE_FILES):
            continue
        if path.name.endswith(WEIGHT_FILE_SUFFIXES):
            continue
        shutil.copy2(path, out / path.name)
        copied.append(path.name)
    return copied


def save_hf_directory(engine_or_model, *, source_dir: str | Path, out_dir: str | Path,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Path | None:
    """Write the full current weights as a Hugging Face model directory (collective under ZeRO-3).

    The result loads with transformers' Auto classes and vLLM: config and safetensors from the model,
    tokenizer / processor / chat-template files copied from ``source_dir``. Only rank 0 writes (it
    holds the full state dict once, as transformers' own ZeRO-3 saving does); returns the directory
    on rank 0 and None elsewhere.
    """
    model = _unwrap(engine_or_model)
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft -> the HF model
    buckets = list(export_weights(model, version=0, bucket_bytes=bucket_bytes))
    if _rank() != 0:
        return None
    _, state = assemble_state_dict(buckets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, state_dict=state)
    copy_model_files(source_dir, out)
    return out


@torch.no_grad()
def greedy_completion(model: torch.nn.Module, inputs: dict, *, max_new_tokens: int) -> list[list[int]]:
    """Greedy (argmax) continuation ids of each prompt row, without the prompt: the reference output.

    ``inputs`` is a processor output (input_ids, attention_mask, pixel_values, image_grid_thw, ...).
    Used to check that exported weights reproduce the learner: run it on the learner's module (a
    ZeRO-3 module works; with several ranks every rank must call it with the same inputs) and on a
    model loaded from the export (or compare with vLLM's temperature-0 output of the exported
    directory).
    """
    import torch.distributed as dist

    model = _unwrap(model)
    synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and any(
        _is_partitioned(p) for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                synced_gpus=synced)
    finally:
        model.train(was_training)
    prompt_length = inputs["input_ids"].shape[1]
    return [row[prompt_length:].tolist() for row in output]
