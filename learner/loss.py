"""Clip-high GRPO loss (DAPO's clip-higher), a pure function of per-token log-probs.

Per token t of sequence b (A_b is the sequence's group advantage, broadcast over its tokens)::

    rho       = exp(logprobs - old_logprobs)
    pg        = -min(rho * A_b, clip(rho, 1 - eps_low, 1 + eps_high) * A_b)
    kl        = exp(ref - logprobs) - (ref - logprobs) - 1          (k3; only when kl_coef > 0)
    loss_tok  = pg + kl_coef * kl

With ``old_logprobs`` recomputed by the learner (``learner.old_logprobs: recompute``) the ratio compares the
policy with itself before the update, not with the weights that sampled: a group generated some versions
ago (async mode), or by an engine whose numerics or nucleus differ, is then trained on as if the current
policy had sampled it. Decoupled PPO (Hilton et al., 2021; AReaL) corrects that with the importance weight
of the proximal policy over the behaviour one, truncated at ``cap`` (TIS), detached::

    w         = min(exp(old_logprobs - behaviour_logprobs), cap)
    pg        = -w * min(rho * A_b, clip(rho, 1 - eps_low, 1 + eps_high) * A_b)

The clip is asymmetric: with A > 0 the ratio may grow to 1 + eps_high before the gradient stops,
with A < 0 it may shrink to 1 - eps_low. eps_high > eps_low keeps low-probability tokens that turn
out good from being clipped too early (DAPO's remedy against entropy collapse).

Aggregation over the unmasked tokens (``mask`` = 1):
  - "token":    sum_bt loss_tok * mask / num_tokens
  - "sequence": sum_b [ sum_t loss_tok * mask / n_b ] / num_sequences     (n_b = tokens of row b)

``num_tokens`` / ``num_sequences`` default to this call's own counts. A global batch that is split
over ranks and micro-batches passes the GLOBAL counts, so that summing the per-piece losses (and
their gradients) gives exactly the loss of the unsplit batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Metric names (namespaced; the same keys appear in logs, Prometheus and dashboards).
LOSS_TOTAL = "loss/total"
LOSS_POLICY = "loss/policy"
LOSS_KL_REF = "loss/kl_ref"
CLIPFRAC_LOW = "loss/clipfrac_low"
CLIPFRAC_HIGH = "loss/clipfrac_high"
APPROX_KL = "loss/approx_kl"
RATIO_MEAN = "loss/ratio_mean"
RATIO_MAX = "loss/ratio_max"
ENTROPY = "loss/entropy"
BEHAVIOUR_WEIGHT_MEAN = "loss/behaviour_weight_mean"  # decoupled PPO: mean truncated weight π_old / π_behaviour
BEHAVIOUR_WEIGHT_CAPPED = "loss/behaviour_weight_capped"  # share of tokens whose weight the cap truncated
NUM_TOKENS = "loss/num_tokens"

AGGREGATIONS = ("token", "sequence")


def k3_kl(*, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(p || q) from samples of p: exp(log_q - log_p) - (log_q - log_p) - 1.

    Non-negative and unbiased (Schulman's k3). Shapes: any, elementwise.
    """
    log_ratio = log_q - log_p
    return torch.exp(log_ratio) - log_ratio - 1.0


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    kl_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    aggregation: str = "token",
    entropy: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
    behaviour_weight_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-high GRPO loss of one (micro-)batch; see the module docstring for the formula.

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the policy being trained (with grad).
        old_logprobs: [B, T] behaviour log-probs (the rollout engine's); no gradient flows into them.
        advantages: [B] one advantage per sequence, broadcast over its tokens.
        mask: [B, T] bool or 0/1 float; 1 on the tokens that are trained on.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio.
        kl_coef: weight of the k3 KL to ``ref_logprobs``; 0 turns it off (the default).
        ref_logprobs: [B, T] reference-policy log-probs; required when kl_coef > 0.
        aggregation: "token" (sum over tokens / token count) or "sequence" (mean per sequence, then
            mean over sequences).
        entropy: [B, T] optional per-token entropy, only reported (masked mean).
        num_tokens: normaliser for "token" aggregation; default: unmasked tokens of this batch.
        num_sequences: normaliser for "sequence" aggregation; default: rows of this batch with at
            least one unmasked token.
        behaviour_logprobs: [B, T] log-probs of the weights that sampled, when ``old_logprobs`` are the
            learner's own (decoupled PPO, module docstring); needs ``behaviour_weight_cap``.
        behaviour_weight_cap: the truncation of the weight, >= 1.

    Returns:
        (loss, stats): loss is a scalar tensor with grad. stats are detached scalars: means over this
        call's unmasked tokens (not over the global normaliser), plus ``loss/num_tokens`` so a caller
        can token-weight them across micro-batches. ``loss/ratio_max`` is a max, not a mean.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low=}, {eps_high=}")
    if kl_coef < 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference policy's log-probs)")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, tensor in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs),
                         ("entropy", entropy), ("behaviour_logprobs", behaviour_logprobs)):
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(shape)}, got {tuple(tensor.shape)}")
    for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError(f"{name} must be > 0 when given, got {value}")
    if (behaviour_logprobs is None) != (behaviour_weight_cap is None):
        raise ValueError("behaviour_logprobs and behaviour_weight_cap go together (decoupled PPO)")
    if behaviour_weight_cap is not None and behaviour_weight_cap < 1.0:
        raise ValueError(f"behaviour_weight_cap must be >= 1, got {behaviour_weight_cap}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages must be [B] = [{shape[0]}], got shape {tuple(advantages.shape)}")

    weight = mask.to(logprobs.dtype)
    keep = mask.bool()
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    # Masked positions (prompt padding, the environment's tokens) hold log-probs that may lie far apart: they are
    # set equal BEFORE any exp, as an overflow there would make the loss and every gradient NaN (inf * 0).
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg_tok = -torch.minimum(ratio * adv, clipped * adv)
    behaviour_weight = None
    if behaviour_logprobs is not None:
        log_weight = torch.where(keep, old_logprobs.detach() - behaviour_logprobs.detach(), 0.0)
        behaviour_weight = torch.exp(log_weight).clamp(max=behaviour_weight_cap)
        pg_tok = behaviour_weight * pg_tok
    loss_tok = pg_tok
    kl_tok = None
    if kl_coef > 0.0:
        ref = ref_logprobs.detach()
        kl_tok = k3_kl(log_p=torch.where(keep, logprobs, ref), log_q=ref)  # KL(policy || ref); 0 where masked
        loss_tok = pg_tok + kl_coef * kl_tok

    tokens_per_row = weight.sum(dim=1)  # [B]
    local_tokens = tokens_per_row.sum()
    if aggregation == "token":
        denom = local_tokens.clamp(min=1.0) if num_tokens is None else num_tokens
        loss = (loss_tok * weight).sum() / denom
    else:
        per_row = (loss_tok * weight).sum(dim=1) / tokens_per_row.clamp(min=1.0)
        denom = (tokens_per_row > 0).sum().clamp(min=1) if num_sequences is None else num_sequences
        loss = per_row.sum() / denom

    stats = _stats(ratio=ratio, log_ratio=log_ratio, adv=adv, weight=weight, pg_tok=pg_tok, kl_tok=kl_tok,
                   entropy=entropy, eps_low=eps_low, eps_high=eps_high, local_tokens=local_tokens,
                   behaviour_weight=behaviour_weight, behaviour_weight_cap=behaviour_weight_cap)
    stats[LOSS_TOTAL] = loss.detach()
    return loss, stats


@torch.no_grad()
def _stats(*, ratio, log_ratio, adv, weight, pg_tok, kl_tok, entropy, eps_low, eps_high, local_tokens,
           behaviour_weight, behaviour_weight_cap):
    """Diagnostics over this call's unmasked tokens (masked means; 0 when no token is unmasked)."""
    count = local_tokens.clamp(min=1.0)

    def masked_mean(values: Tensor) -> Tensor:
        return (values.to(weight.dtype) * weight).sum() / count

    # A clip is ACTIVE (its gradient is zero) only on the side the advantage pushes towards.
    low_active = (adv < 0) & (ratio < 1.0 - eps_low)
    high_active = (adv > 0) & (ratio > 1.0 + eps_high)
    valid = weight > 0
    stats = {
        LOSS_POLICY: masked_mean(pg_tok),
        CLIPFRAC_LOW: masked_mean(low_active),
        CLIPFRAC_HIGH: masked_mean(high_active),
        APPROX_KL: masked_mean(torch.exp(log_ratio) - log_ratio - 1.0),  # k3 of KL(old || new), log_ratio = new - old
        RATIO_MEAN: masked_mean(ratio),
        RATIO_MAX: ratio[valid].max() if bool(valid.any()) else ratio.new_zeros(()),
        NUM_TOKENS: local_tokens.clone(),
    }
    if kl_tok is not None:
        stats[LOSS_KL_REF] = masked_mean(kl_tok)
    if entropy is not None:
        stats[ENTROPY] = masked_mean(entropy)
    if behaviour_weight is not None:
        stats[BEHAVIOUR_WEIGHT_MEAN] = masked_mean(behaviour_weight)
        stats[BEHAVIOUR_WEIGHT_CAPPED] = masked_mean(behaviour_weight >= behaviour_weight_cap)
    return {name: value.detach() for name, value in stats.items()}


SFT_NLL = "loss/sft_nll"  # mean negative log-likelihood per trained token (the SFT loss itself)


def sft_loss(logprobs: Tensor, mask: Tensor, *, num_tokens: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of supervised fine-tuning: the negative log-likelihood of the target tokens.

    loss = -sum_bt logprobs * mask / num_tokens

    Args:
        logprobs: [B, T] log-probs of the target tokens under the model being trained (with grad).
        mask: [B, T] bool or 0/1 float; 1 on the tokens that are trained on (the answer tokens).
        num_tokens: normaliser; default: unmasked tokens of this batch. A batch split over ranks and
            micro-batches passes the GLOBAL count, so the pieces' losses sum to the whole batch's.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} differ")
    weight = mask.to(logprobs.dtype)
    local_tokens = weight.sum()
    norm = local_tokens.clamp(min=1.0) if num_tokens is None else torch.as_tensor(num_tokens, dtype=logprobs.dtype)
    loss = -(logprobs * weight).sum() / norm
    return loss, {LOSS_TOTAL: loss.detach(), SFT_NLL: (-(logprobs.detach() * weight).sum() / local_tokens.clamp(min=1.0)),
                  NUM_TOKENS: local_tokens.detach()}
