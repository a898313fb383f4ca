"""Group-relative advantages (GRPO) and the zero-signal test used by dynamic sampling.

Rewards arrive as a [G, N] table: G prompt groups, N samples of each. Every sample of a group
answered the same prompt, so the group mean is the baseline; the advantage says how much better
than its siblings a sample did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")


def _as_table(values: Tensor | Sequence[Sequence[float]], *, name: str) -> Tensor:
    table = torch.as_tensor(values, dtype=torch.float64)
    if table.dim() != 2 or table.shape[1] == 0:
        raise ValueError(f"{name} must be a [G, N] table with N >= 1, got shape {tuple(table.shape)}")
    return table


def apply_penalties(rewards: Tensor | Sequence[Sequence[float]],
                    penalties: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """rewards + penalties, both [G, N] -> [G, N] float64.

    Penalties (e.g. the soft overlong penalty, in [-1, 0]) are computed by the caller from the
    rewards package; the learner does not import it. Apply them BEFORE ``signal_mask`` and
    ``group_advantages`` so both see the same numbers.
    """
    table = _as_table(rewards, name="rewards")
    extra = _as_table(penalties, name="penalties")
    if extra.shape != table.shape:
        raise ValueError(f"penalties shape {tuple(extra.shape)} != rewards shape {tuple(table.shape)}")
    return table + extra


def group_advantages(rewards: Tensor | Sequence[Sequence[float]], *, scale: str = "group",
                     eps: float = 1e-4) -> Tensor:
    """Advantages A[g, i] = (r[g, i] - mean_g) / (std + eps); rewards [G, N] -> float32 [G, N].

    scale:
      - "group": std of the sample's own group (GRPO).
      - "batch": std of all G*N rewards of the batch (the centring is still per group). Groups with a
        tiny spread then get small advantages instead of being blown up to unit scale.
      - "none":  centring only, A = r - mean_g (Dr. GRPO's choice; no difficulty re-weighting).

    std is the BIASED (population, ddof=0) one: the N samples are the whole group whose mean is
    subtracted, so this makes a group's advantages exactly unit-RMS whatever N is, and a group of
    N = 1 gets A = 0 instead of the NaN of the unbiased std. TRL and verl use the unbiased std,
    whose advantages are smaller by sqrt((N - 1) / N) (0.87 at N = 4): an lr ported from them
    corresponds to an lr about 13% lower here. Groups with equal rewards get A = 0 exactly.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if eps <= 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    table = _as_table(rewards, name="rewards")
    centred = table - table.mean(dim=1, keepdim=True)
    # The mean of equal floats can differ from them in the last bit; make zero-signal groups exact.
    centred = torch.where(signal_mask(table)[:, None], centred, torch.zeros_like(centred))
    if scale == "group":
        centred = centred / (table.std(dim=1, correction=0, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (table.std(correction=0) + eps)
    return centred.to(torch.float32)


def signal_mask(rewards: Tensor | Sequence[Sequence[float]], *, atol: float = 0.0) -> Tensor:
    """bool [G]: True for groups whose rewards are not all equal (max - min > atol).

    Groups that are all-correct or all-wrong have zero advantage everywhere and only dilute the
    batch; dynamic sampling drops them and the caller refills with fresh groups.
    """
    if atol < 0.0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    table = _as_table(rewards, name="rewards")
    spread = table.max(dim=1).values - table.min(dim=1).values
    return spread > atol
