"""Collate trajectory groups into padded learner tensors, with each group's image stored once.

Token layout of row b (right-padded to the batch's longest sequence)::

    position:  0 ........ P-1 | P ............. P+C-1 | P+C ... L-1
    input_ids: prompt_ids     | completion_ids        | pad_token_id
    attention: 1 ............ 1 | 1 ............... 1 | 0 ....... 0
    completion_mask: 0 ...... 0 | loss_mask of each   | 0 ....... 0

Token-shift convention (used by ``old_logprobs`` here and by ``forward.sequence_logprobs``): the
value at position t is the log-prob OF token ``input_ids[t]``, which the model predicts from the
logits at position t - 1. So position 0 never carries a log-prob, and the completion's first token
(at P >= 1) is scored by the prompt's last position.

Images: ``pixel_values`` / ``image_grid_thw`` hold every UNIQUE image once (a group's prompt image
once for its N samples, plus each trajectory's zoom crops). ``image_index[b]`` lists the images of
row b in the order their ``<|image_pad|>`` runs appear in its tokens: the group image first, then
its zoom crops.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from actors.types import TrajectoryGroup


@dataclass
class LearnerBatch:
    """Padded tensors of B samples (rows) and their U unique images; see the module docstring."""

    input_ids: Tensor  # [B, L] long: prompt + completion, right-padded with pad_token_id
    attention_mask: Tensor  # [B, L] long: 1 on real tokens
    completion_mask: Tensor  # [B, L] float32: 1 on completion tokens whose loss_mask is 1
    old_logprobs: Tensor  # [B, L] float32: behaviour log-prob of input_ids[b, t] at t; 0 elsewhere
    advantages: Tensor  # [B] float32
    pixel_values: Tensor  # [sum_u t*h*w, C*tp*p*p]: patches of the unique images, image after image
    image_grid_thw: Tensor  # [U, 3] long: (t, h, w) patch grid of each unique image
    image_index: list[list[int]]  # per row: indices into image_grid_thw, in order of appearance
    group_ids: list[str]  # per row: the TrajectoryGroup it came from

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        """Tokens trained on: the ``num_tokens`` normaliser of ``grpo_loss`` for this batch."""
        return int(self.completion_mask.sum().item())

    @property
    def num_loss_sequences(self) -> int:
        """Rows with at least one trained token: the ``num_sequences`` normaliser of ``grpo_loss``."""
        return int((self.completion_mask.sum(dim=1) > 0).sum().item())

    @property
    def group_image_index(self) -> Tensor:
        """[B] long: index of each row's group (prompt) image in ``image_grid_thw``."""
        return torch.tensor([row[0] for row in self.image_index], dtype=torch.long)

    def image_patch_slices(self) -> list[slice]:
        """Row range of each unique image inside ``pixel_values``."""
        sizes = self.image_grid_thw.prod(dim=1).tolist()
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        return [slice(starts[i], starts[i + 1]) for i in range(len(sizes))]

    def select(self, rows: Sequence[int]) -> LearnerBatch:
        """A batch of the given rows, keeping only the images they use and trimming shared padding."""
        rows = list(rows)
        if not rows:
            raise ValueError("select needs at least one row")
        used: list[int] = []  # unique images in first-use order
        for row in rows:
            used.extend(i for i in self.image_index[row] if i not in used)
        remap = {old: new for new, old in enumerate(used)}
        slices = self.image_patch_slices()
        index = torch.tensor(rows, dtype=torch.long)
        length = int(self.attention_mask[index].sum(dim=1).max().item())
        return LearnerBatch(
            input_ids=self.input_ids[index, :length],
            attention_mask=self.attention_mask[index, :length],
            completion_mask=self.completion_mask[index, :length],
            old_logprobs=self.old_logprobs[index, :length],
            advantages=self.advantages[index],
            pixel_values=torch.cat([self.pixel_values[slices[i]] for i in used]),
            image_grid_thw=self.image_grid_thw[torch.tensor(used, dtype=torch.long)],
            image_index=[[remap[i] for i in self.image_index[row]] for row in rows],
            group_ids=[self.group_ids[row] for row in rows],
        )

    def split(self, n: int) -> list[LearnerBatch]:
        """n contiguous pieces of whole samples, sizes differing by at most one (ranks, micro-batches).

        Rows are ordered by group, so contiguous pieces keep most groups' samples together and each
        group image is encoded by as few pieces as possible. Every piece carries the images it needs.
        """
        if not 1 <= n <= self.num_samples:
            raise ValueError(f"cannot split {self.num_samples} samples into {n} pieces")
        base, extra = divmod(self.num_samples, n)
        pieces, start = [], 0
        for i in range(n):
            stop = start + base + (1 if i < extra else 0)
            pieces.append(self.select(range(start, stop)))
            start = stop
        return pieces

    def micro_batches(self, max_samples: int) -> list[LearnerBatch]:
        """Contiguous pieces of at most ``max_samples`` samples each (the last may be smaller)."""
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        return [self.select(range(start, min(start + max_samples, self.num_samples)))
                for start in range(0, self.num_samples, max_samples)]

    def to(self, device: torch.device | str) -> LearnerBatch:
        """The same batch with every tensor on ``device``."""
        return LearnerBatch(
            input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device), old_logprobs=self.old_logprobs.to(device),
            advantages=self.advantages.to(device), pixel_values=self.pixel_values.to(device),
            image_grid_thw=self.image_grid_thw.to(device), image_index=[list(r) for r in self.image_index],
            group_ids=list(self.group_ids),
        )


def _decode_image(data: bytes, *, what: str):
    from PIL import Image  # lazily: only collation needs PIL

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises several unrelated types for bad bytes
        raise ValueError(f"{what}: cannot decode image bytes ({error})") from error


def _advantage_rows(advantages: list[list[float]] | Tensor, groups: list[TrajectoryGroup]) -> list[list[float]]:
    rows = advantages.tolist() if isinstance(advantages, Tensor) else [list(r) for r in advantages]
    if len(rows) != len(groups):
        raise ValueError(f"advantages has {len(rows)} groups, batch has {len(groups)}")
    for group, row in zip(groups, rows):
        if len(row) != len(group.trajectories):
            raise ValueError(f"group {group.group_id}: {len(row)} advantages for {len(group.trajectories)} samples")
    return rows


def collate(groups: list[TrajectoryGroup], *, image_processor, pad_token_id: int,
            advantages: list[list[float]] | Tensor) -> LearnerBatch:
    """Pad the trajectories of ``groups`` into a ``LearnerBatch``; rows follow group then sample order.

    Args:
        groups: complete trajectory groups (G of them, B trajectories in all).
        image_processor: the Qwen2.5-VL image processor the rollout used to expand the image pads;
            the PIL one (``Qwen2VLImageProcessorPil``) works without torchvision.
        pad_token_id: id written into the padding positions (never attended or trained on).
        advantages: per group, one advantage per trajectory ([G, N] tensor or ragged lists).

    Raises ValueError naming the group and sample where a trajectory breaks the invariants of
    ``actors.types.Trajectory`` (lengths of completion / log-probs / loss mask, empty prompt) or an
    image does not decode: these come only from an upstream bug, and silently training on a
    shrunken batch would hide it.
    """
    if not groups:
        raise ValueError("collate needs at least one group")
    adv_rows = _advantage_rows(advantages, groups)
    images, image_index, sequences, group_ids, adv = [], [], [], [], []
    for group, group_adv in zip(groups, adv_rows):
        group_image = len(images)
        images.append(_decode_image(group.prompt.image, what=f"group {group.group_id} prompt image"))
        for traj, value in zip(group.trajectories, group_adv):
            where = f"group {group.group_id} sample {traj.sample_index}"
            n = len(traj.completion_ids)
            if len(traj.behaviour_logprobs) != n or len(traj.loss_mask) != n:
                raise ValueError(f"{where}: completion_ids ({n}), behaviour_logprobs "
                                 f"({len(traj.behaviour_logprobs)}) and loss_mask ({len(traj.loss_mask)}) differ")
            if not traj.prompt_ids:
                raise ValueError(f"{where}: empty prompt_ids (the first completion token needs a predecessor)")
            row_images = [group_image]
            for k, crop in enumerate(traj.zoom_images):
                row_images.append(len(images))
                images.append(_decode_image(crop, what=f"{where} zoom image {k}"))
            image_index.append(row_images)
            sequences.append(traj)
            group_ids.append(group.group_id)
            adv.append(value)

    lengths = [len(t.prompt_ids) + len(t.completion_ids) for t in sequences]
    batch, length = len(sequences), max(lengths)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    completion_mask = torch.zeros((batch, length), dtype=torch.float32)
    old_logprobs = torch.zeros((batch, length), dtype=torch.float32)
    for row, traj in enumerate(sequences):
        start, stop = len(traj.prompt_ids), lengths[row]
        input_ids[row, :stop] = torch.tensor(traj.prompt_ids + traj.completion_ids, dtype=torch.long)
        attention_mask[row, :stop] = 1
        completion_mask[row, start:stop] = torch.tensor(traj.loss_mask, dtype=torch.float32)
        old_logprobs[row, start:stop] = torch.tensor(traj.behaviour_logprobs, dtype=torch.float32)

    processed = image_processor(images=images, return_tensors="pt")
    return LearnerBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        old_logprobs=old_logprobs,
        advantages=torch.tensor(adv, dtype=torch.float32),
        pixel_values=processed["pixel_values"],
        image_grid_thw=processed["image_grid_thw"].to(torch.long),
        image_index=image_index,
        group_ids=group_ids,
    )
