"""Per-token log-probs of a ``LearnerBatch`` under a Qwen2.5-VL policy, encoding each image once.

GRPO samples N completions of one prompt, so the N rows of a group share the same prompt image.
Running the vision tower per row repeats the same encoding N times (forward AND backward). Here the
tower runs once on the batch's unique images; every row then receives its images' embeddings
through ``mm_encoder_outputs``, transformers' own hook for precomputed encoder outputs, so the
model's own code still scatters them into the ``<|image_pad|>`` positions and computes the mrope
position ids (``get_rope_index``). Each image's embeddings are one node of the graph, used by all rows
of its group: the vision backward receives their summed gradient, exactly what N separate encodings
would accumulate into the vision weights.

Pass the Hugging Face model itself (under DeepSpeed, ``engine.module``); ZeRO-3 gathers parameters
through module hooks, so calling the vision tower and the full model separately is fine.

``mm_encoder_outputs`` is a parameter of Qwen2.5-VL's forward in transformers 5.19 but not in 5.17 (the
pin admits both): there it lands in ``**kwargs`` and is ignored, so the language model would read the
bare ``<|image_pad|>`` embeddings: no image, and no gradient for the vision tower. Where the model's
forward does not name it, each row's images are encoded by the model itself (the reference path).
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import Tensor

from actors.types import placeholder_token_ids
from learner.batch import LearnerBatch

log = logging.getLogger(__name__)


def accepts_encoder_outputs(model) -> bool:
    """Whether ``model``'s forward takes precomputed image embeddings (``mm_encoder_outputs``).

    ``model`` may be the HF model, a peft wrapper of it, or anything that forwards attribute reads to
    one (the learner's ``EngineForward``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = base.forward
    return _takes_encoder_outputs(getattr(forward, "__func__", forward))


@functools.cache
def _takes_encoder_outputs(forward_function) -> bool:
    """Read once per forward function: ``sequence_logprobs`` asks on every micro-batch."""
    return "mm_encoder_outputs" in inspect.signature(forward_function).parameters


@functools.cache
def _warn_no_encoder_outputs() -> None:
    import transformers

    log.warning("transformers %s: Qwen2.5-VL's forward takes no mm_encoder_outputs; images are encoded once "
                "per sample instead of once per group (same result, more vision compute)", transformers.__version__)


def _check_image_pads(batch: LearnerBatch, *, image_token_id: int, merge_size: int) -> None:
    """Each row must hold exactly as many image pads as its images have merged patches.

    The model only checks the batch total; a per-row mismatch would silently shift embeddings
    between rows (e.g. when rollout and learner resize images differently).
    """
    tokens_per_image = (batch.image_grid_thw.prod(dim=1) // merge_size**2).tolist()
    pads = (batch.input_ids == image_token_id).sum(dim=1).tolist()
    for row, images in enumerate(batch.image_index):
        expected = sum(tokens_per_image[i] for i in images)
        if pads[row] != expected:
            raise ValueError(f"row {row} (group {batch.group_ids[row]}): {pads[row]} image pad tokens but its "
                             f"{len(images)} image(s) give {expected} embeddings; rollout and learner must use "
                             "the same image processor settings")


def sequence_logprobs(model, batch: LearnerBatch, *, encode_images_once_per_group: bool = True,
                      with_entropy: bool = False, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the actual next tokens: float32 [B, L], aligned like ``batch.old_logprobs``.

    out[b, t] = log softmax(logits[b, t - 1] / temperature)[input_ids[b, t]], computed in float32. Positions that
    are not scored are 0: position 0, padding, and prompt positions before the batch's earliest
    completion token (their logits are not computed: ``logits_to_keep`` skips the long image prompt);
    later prompt positions of other rows hold real log-probs, which ``completion_mask`` excludes.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration`` (under DeepSpeed: ``engine.module``).
        batch: from ``learner.batch.collate`` (already on the model's device).
        encode_images_once_per_group: True runs the vision tower once on the unique images; False is
            the reference path: a plain model forward with every row's images repeated.
            True falls back to False where the model's forward takes no ``mm_encoder_outputs``.
        with_entropy: also return the per-token entropy of the predicting distribution [B, L]
            (detached; for metrics only), same alignment.
        temperature: the distribution the rollout sampled from (the engines' behaviour log-probs are
            of logits / temperature, actors/engines/base.py); 1 is the model's own.
    """
    config = model.config
    image_token_id = config.image_token_id
    _check_image_pads(batch, image_token_id=image_token_id, merge_size=config.vision_config.spatial_merge_size)

    # The rows' images in the order the model consumes them: row by row, pad run by pad run.
    sequence_images = [i for row in batch.image_index for i in row]
    grid = batch.image_grid_thw[torch.tensor(sequence_images, dtype=torch.long, device=batch.image_grid_thw.device)]
    length = batch.input_ids.shape[1]
    trained_rows = batch.completion_mask.sum(dim=1) > 0
    first_scored = 1  # position 0 has no predecessor
    if bool(trained_rows.any()):
        first_scored = max(1, int(batch.completion_mask[trained_rows].argmax(dim=1).min().item()))
    keep = length - first_scored + 1  # logits of positions first_scored-1 .. L-1
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        image_grid_thw=grid,
        # Without mm_token_type_ids, transformers 5.x silently falls back to 1-D text positions.
        mm_token_type_ids=(batch.input_ids == image_token_id).to(torch.int32),
        use_cache=False,
        logits_to_keep=keep,
    )
    if encode_images_once_per_group and not accepts_encoder_outputs(model):
        _warn_no_encoder_outputs()
        encode_images_once_per_group = False
    if encode_images_once_per_group:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        unique = model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
        per_row = tuple(unique.pooler_output[i] for i in sequence_images)
        output = model(**inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=per_row)})
    else:
        slices = batch.image_patch_slices()
        repeated = torch.cat([batch.pixel_values[slices[i]] for i in sequence_images])
        output = model(**inputs, pixel_values=repeated)

    logits = output.logits[:, :-1].float()  # [B, keep-1, V]: predict tokens first_scored .. L-1
    if temperature != 1.0:
        logits = logits / temperature
    # Rollout engines never sample image/video placeholders: score over the same distribution.
    banned = torch.tensor(placeholder_token_ids(config), dtype=torch.long, device=logits.device)
    logits = logits.index_fill(-1, banned, float("-inf"))
    targets = batch.input_ids[:, first_scored:]
    log_norm = torch.logsumexp(logits, dim=-1)
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    # Placeholders are never model tokens: the image pads a zoom turn inserts, or a prompt's own pads where
    # the row's prompt is longer than the batch's shortest. Under the banned distribution their log-prob
    # is -inf, which a 0 in the loss mask would turn into NaN (0 * -inf), so they score 0 like padding.
    valid = batch.attention_mask[:, first_scored:].bool() & ~torch.isin(targets, banned)
    unscored = torch.zeros((targets.shape[0], first_scored), dtype=torch.float32, device=logits.device)
    logprobs = torch.cat([unscored, torch.where(valid, token_logp, torch.zeros_like(token_logp))], dim=1)

    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            token_entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # 0·log 0 = 0 at masked tokens
            entropy = torch.cat([unscored, torch.where(valid, token_entropy, torch.zeros_like(token_entropy))], dim=1)
    return logprobs, entropy
