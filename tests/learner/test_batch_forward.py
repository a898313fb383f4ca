"""Collation and the one-image-encoding-per-group forward on a tiny random Qwen2.5-VL (float32, CPU).

Two groups of four samples with completions of different lengths; one sample of group 1 zoomed once
(its completion holds an environment turn with the crop's image pads, loss-masked).
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup  # noqa: E402
from actors.types import placeholder_token_ids
from learner.batch import collate  # noqa: E402
from learner.forward import sequence_logprobs  # noqa: E402
from learner.loss import grpo_loss  # noqa: E402

PAD, EOS = 0, 2
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 1000, 1001, 1002, 1003
COMPLETION_LENGTHS = [[3, 5, 7, 9], [4, 6, 8, 10]]
ZOOMED = (1, 1)  # (group, sample) that asked for one zoom
# Group images: 4x6 and 6x4 merged cells of 28 px (24 pads each), so the vision tower's 112-px
# windows (4x4 cells) split them and its window permutation is exercised. The zoom crop: 2x2 cells.
GROUP_IMAGE_SIZES = [(112, 168), (168, 112)]
ZOOM_SIZE = (56, 56)


@pytest.fixture(scope="module")
def model():
    """The project's tiny Qwen2.5-VL architecture (models.build), random weights, float32.

    Built from the config alone: ``build_model`` also trains a tokenizer (~14 s) that these tests
    do not need, since they write token ids directly.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.build import SIZES, qwen2_5_vl_config

    token_ids = {"<|endoftext|>": PAD, "<|im_end|>": EOS, "<|image_pad|>": IMAGE_PAD, "<|video_pad|>": VIDEO_PAD,
                 "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END}
    torch.manual_seed(0)
    config = qwen2_5_vl_config(SIZES["tiny"], token_ids=token_ids)
    assert config.tie_word_embeddings  # lm_head shares the embedding: its gradient has two sources
    return Qwen2_5_VLForConditionalGeneration(config).float().train()


@pytest.fixture(scope="module")
def processor():
    # The PIL image processor: transformers 5.x's plain Qwen2VLImageProcessor needs torchvision.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)  # build_model defaults


def _png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_tokens(height: int, width: int) -> list[int]:
    # Sizes here are multiples of 28 inside [min_pixels, max_pixels]: the processor keeps them.
    return [VISION_START] + [IMAGE_PAD] * ((height // 28) * (width // 28)) + [VISION_END]


def _groups(completion_lengths=COMPLETION_LENGTHS, seed: int = 0) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for g, lengths in enumerate(completion_lengths):
        height, width = GROUP_IMAGE_SIZES[g % 2]
        prompt_ids = [EOS] + _image_tokens(height, width) + rng.integers(3, 100, 4 + g).tolist()
        trajectories = []
        for i, n in enumerate(lengths):
            completion = rng.integers(3, 100, n).tolist()
            loss_mask = [1] * n
            zooms = []
            if (g, i) == ZOOMED:  # model turn, env turn showing the crop, model turn
                env = [5] + _image_tokens(*ZOOM_SIZE) + [6]
                completion = completion[:3] + env + completion[3:]
                loss_mask = [1] * 3 + [0] * len(env) + [1] * (n - 3)
                zooms = [_png(*ZOOM_SIZE, seed=100 + g)]
            logprobs = [float(-rng.uniform(0.1, 3.0)) if m else 0.0 for m in loss_mask]
            trajectories.append(Trajectory(sample_index=i, prompt_ids=prompt_ids, completion_ids=completion,
                                           behaviour_logprobs=logprobs, loss_mask=loss_mask,
                                           completion_text="", zoom_images=zooms,
                                           zoom_boxes=[[0, 0, 28, 28]] * len(zooms)))
        prompt = PromptGroup(group_id=f"p{g}#0", prompt_id=f"p{g}", task="camo", difficulty="easy", question="?",
                             image=_png(height, width, seed=g),
                             target=Target(present=False, category=None, boxes=[], width=width, height=height),
                             stage=1)
        groups.append(TrajectoryGroup(prompt=prompt, trajectories=trajectories, policy_version=0))
    return groups


def _advantages(groups):
    return [[0.5 * (i - 1.5) * (g + 1) for i in range(len(gr.trajectories))] for g, gr in enumerate(groups)]


@pytest.fixture(scope="module")
def batch(processor):
    groups = _groups()
    return collate(groups, image_processor=processor, pad_token_id=PAD, advantages=_advantages(groups))


def test_collate_layout_and_token_shift(batch):
    groups = _groups()
    assert batch.num_samples == 8 and batch.group_ids == ["p0#0"] * 4 + ["p1#0"] * 4
    # Two group images plus one zoom crop, each stored once.
    assert batch.image_grid_thw.tolist() == [[1, 8, 12], [1, 12, 8], [1, 4, 4]]  # in 14-px patches
    assert batch.pixel_values.shape == (96 + 96 + 16, 3 * 2 * 14 * 14)
    assert batch.image_index == [[0], [0], [0], [0], [1], [1, 2], [1], [1]]
    assert batch.group_image_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    longest = max(len(t.prompt_ids) + len(t.completion_ids) for g in groups for t in g.trajectories)
    assert batch.input_ids.shape == (8, longest)
    for row, traj in enumerate(t for g in groups for t in g.trajectories):
        p, n = len(traj.prompt_ids), len(traj.completion_ids)
        assert batch.input_ids[row, :p + n].tolist() == traj.prompt_ids + traj.completion_ids
        assert batch.input_ids[row, p + n:].eq(PAD).all() and batch.attention_mask[row].sum() == p + n
        assert batch.completion_mask[row, :p].eq(0).all()
        assert batch.completion_mask[row, p:p + n].tolist() == traj.loss_mask
        # Token shift: the behaviour log-prob of completion token j sits at its own position p + j.
        assert batch.old_logprobs[row, p:p + n].tolist() == pytest.approx(traj.behaviour_logprobs)
    assert batch.num_loss_tokens == sum(sum(l) for l in COMPLETION_LENGTHS)  # zoom env tokens excluded
    assert batch.advantages.tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75, -1.5, -0.5, 0.5, 1.5])


def test_collate_is_consistent_with_processing_each_image_alone(batch, processor):
    crop = Image.open(io.BytesIO(_png(*ZOOM_SIZE, seed=101))).convert("RGB")
    alone = processor(images=[crop], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch.pixel_values[batch.image_patch_slices()[2]], alone)


def test_split_keeps_the_images_each_piece_needs(batch):
    first, second = batch.split(2)
    assert first.image_index == [[0]] * 4 and first.image_grid_thw.tolist() == [[1, 8, 12]]
    assert second.image_index == [[0], [0, 1], [0], [0]]
    assert second.image_grid_thw.tolist() == [[1, 12, 8], [1, 4, 4]]
    torch.testing.assert_close(second.pixel_values, batch.pixel_values[96:])
    # Padding shared by a piece is trimmed: group 0's longest row is shorter than the batch's.
    assert first.input_ids.shape[1] == int(batch.attention_mask[:4].sum(dim=1).max())
    assert [p.num_samples for p in batch.split(3)] == [3, 3, 2]
    assert [p.num_samples for p in batch.micro_batches(3)] == [3, 3, 2]
    assert sum(p.num_loss_tokens for p in batch.split(3)) == batch.num_loss_tokens
    with pytest.raises(ValueError, match="split"):
        batch.split(9)


class _VisionCalls:
    """Forward hook on the vision tower recording the image grids it encodes per call."""

    def __init__(self, model):
        self.grids: list[list[list[int]]] = []
        self.handle = model.model.visual.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.grids.append(kwargs.get("grid_thw", args[1] if len(args) > 1 else None).tolist())


def _loss_and_grads(model, batch, *, once: bool):
    model.zero_grad(set_to_none=True)
    logprobs, _ = sequence_logprobs(model, batch, encode_images_once_per_group=once)
    loss, _ = grpo_loss(logprobs, batch.old_logprobs, batch.advantages, batch.completion_mask)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), loss.detach(), grads


def test_once_per_group_matches_per_sample_encoding(model, batch):
    calls = _VisionCalls(model)
    try:
        logp_once, loss_once, grads_once = _loss_and_grads(model, batch, once=True)
        logp_each, loss_each, grads_each = _loss_and_grads(model, batch, once=False)
    finally:
        calls.handle.remove()
    # Shared path: one call encoding each group image once plus the zoom crop; reference: 8 + 1 images.
    assert calls.grids[0] == [[1, 8, 12], [1, 12, 8], [1, 4, 4]]
    assert len(calls.grids[1]) == 9 and calls.grids[1].count([1, 8, 12]) == 4
    torch.testing.assert_close(logp_once, logp_each)
    torch.testing.assert_close(loss_once, loss_each)
    assert grads_once.keys() == grads_each.keys()
    assert any(name.startswith("model.visual.") for name in grads_once)  # the vision tower is trained
    for name, grad in grads_once.items():
        torch.testing.assert_close(grad, grads_each[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_an_unpadded_single_sample_forward(model, batch, temperature):
    """Right padding, the image order and the token shift against the plain model on one row at a time;
    at a sampling temperature, the log-probs and entropy are of log_softmax(logits / temperature)."""
    with torch.no_grad():
        logprobs, entropy = sequence_logprobs(model, batch, with_entropy=True, temperature=temperature)
        slices = batch.image_patch_slices()
        for row in (0, 3, 5):
            length = int(batch.attention_mask[row].sum())
            ids = batch.input_ids[row:row + 1, :length]
            images = batch.image_index[row]
            out = model(input_ids=ids, pixel_values=torch.cat([batch.pixel_values[slices[i]] for i in images]),
                        image_grid_thw=batch.image_grid_thw[images], mm_token_type_ids=(ids == IMAGE_PAD).int(),
                        use_cache=False)
            logits = out.logits[0].float() / temperature
            logits[:, placeholder_token_ids(model.config)] = float("-inf")  # never sampled (actors.types)
            log_probs = torch.log_softmax(logits, dim=-1)
            expected = log_probs[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # token t scored at t - 1
            scored = batch.completion_mask[row, :length].bool()
            torch.testing.assert_close(logprobs[row, :length][scored], expected[scored[1:]])
            assert logprobs[row, length:].eq(0).all() and entropy[row, length:].eq(0).all()
            expected_entropy = -torch.special.xlogy(log_probs.exp(), log_probs.exp()).sum(-1)[:-1]
            torch.testing.assert_close(entropy[row, :length][scored], expected_entropy[scored[1:]])


def test_image_pads_a_zoom_inserted_score_zero_so_losses_stay_finite(model, batch):
    """The zoomed row's environment turn holds image pads, which the model may never sample (-inf
    log-prob): they score 0, so the SFT and GRPO losses, whose masks are 0 there, stay finite."""
    from learner.loss import sft_loss

    logprobs, entropy = sequence_logprobs(model, batch, with_entropy=True)
    row = 4 + ZOOMED[1]  # group 1's rows follow group 0's four
    pads = batch.input_ids[row] == IMAGE_PAD
    assert pads.sum() > ZOOM_SIZE[0] // 28 * ZOOM_SIZE[1] // 28  # the prompt image's pads and the crop's
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert logprobs[row][pads].eq(0).all()
    loss, _ = sft_loss(logprobs, batch.completion_mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_split_pieces_give_the_rows_of_the_whole(model, batch):
    with torch.no_grad():
        whole, _ = sequence_logprobs(model, batch)
        start = 0
        for piece in batch.split(3):
            part, _ = sequence_logprobs(model, piece)
            rows = whole[start:start + piece.num_samples]
            mask = piece.completion_mask.bool()
            torch.testing.assert_close(part[mask], rows[:, :part.shape[1]][mask])
            start += piece.num_samples


def test_pad_count_mismatch_is_a_clear_error(model, processor):
    groups = _groups()
    traj = groups[0].trajectories[0]
    first_pad = traj.prompt_ids.index(IMAGE_PAD)
    traj.prompt_ids = traj.prompt_ids[:first_pad] + traj.prompt_ids[first_pad + 1:]  # 23 pads, 24 embeddings
    broken = collate(groups, image_processor=processor, pad_token_id=PAD, advantages=_advantages(groups))
    with pytest.raises(ValueError, match="row 0 .*image pad"):
        sequence_logprobs(model, broken)


def test_collate_rejects_inconsistent_trajectories(processor):
    groups = _groups()
    groups[1].trajectories[2].behaviour_logprobs.pop()
    with pytest.raises(ValueError, match="group p1#0 sample 2"):
        collate(groups, image_processor=processor, pad_token_id=PAD, advantages=_advantages(groups))
    groups = _groups()
    with pytest.raises(ValueError, match="advantages"):
        collate(groups, image_processor=processor, pad_token_id=PAD, advantages=[[0.0] * 4])
    groups[0].prompt.image = b"not a png"
    with pytest.raises(ValueError, match="group p0#0 prompt image"):
        collate(groups, image_processor=processor, pad_token_id=PAD, advantages=_advantages(groups))


def test_a_forward_without_encoder_outputs_falls_back_to_encoding_each_row(model, batch):
    """transformers 5.17's Qwen2.5-VL forward has no ``mm_encoder_outputs`` parameter and swallows it in **kwargs:
    the images were silently dropped (found on the GPU machine, tests/gpu). Emulated here by a subclass whose
    forward ignores it the same way; the learner must then encode each row's images itself."""
    from learner.forward import accepts_encoder_outputs

    class IgnoresEncoderOutputs(type(model)):
        def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, **kwargs):
            kwargs.pop("mm_encoder_outputs", None)  # what 5.17 does, in effect
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                   image_grid_thw=image_grid_thw, **kwargs)

    assert accepts_encoder_outputs(model)
    old_class = model.__class__
    model.__class__ = IgnoresEncoderOutputs
    try:
        assert not accepts_encoder_outputs(model)
        logp_once, _, grads_once = _loss_and_grads(model, batch, once=True)
    finally:
        model.__class__ = old_class
    logp_each, _, _ = _loss_and_grads(model, batch, once=False)
    torch.testing.assert_close(logp_once, logp_each)
    assert any(name.startswith("model.visual.") and grad.abs().sum() > 0 for name, grad in grads_once.items())
