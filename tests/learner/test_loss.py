"""Clip-high GRPO loss against hand-computed values (eps_low = 0.2, eps_high = 0.28 throughout)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from learner import loss as L  # noqa: E402
from learner.loss import grpo_loss  # noqa: E402

RATIOS = [0.5, 1.0, 1.5]


def _table(mask=None):
    """Row 0 has A = +1, row 1 has A = -2; both rows hold ratios 0.5, 1.0, 1.5 (old log-probs = 0).

    Per-token loss -min(rho*A, clip(rho, 0.8, 1.28)*A) and its gradient d/dlogp:
      row 0, A=+1:  rho=0.5: -min(0.5, 0.8)   = -0.5   (low side does not clip for A>0; grad -rho*A = -0.5)
                    rho=1.0: -min(1, 1)       = -1.0   (grad -1)
                    rho=1.5: -min(1.5, 1.28)  = -1.28  (HIGH clip active: grad 0)
      row 1, A=-2:  rho=0.5: -min(-1, -1.6)   = +1.6   (LOW clip active: grad 0)
                    rho=1.0: -min(-2, -2)     = +2.0   (grad -rho*A = 2)
                    rho=1.5: -min(-3, -2.56)  = +3.0   (high side does not clip for A<0; grad 3)
    """
    logprobs = torch.log(torch.tensor([RATIOS, RATIOS], dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64) if mask is None else mask
    return logprobs, old, adv, mask


def test_token_aggregation_values_and_stats():
    logprobs, old, adv, mask = _table()
    loss, stats = grpo_loss(logprobs, old, adv, mask)
    # (-0.5 - 1 - 1.28 + 1.6 + 2 + 3) / 6 = 3.82 / 6
    assert loss.item() == pytest.approx(3.82 / 6)
    assert stats[L.CLIPFRAC_LOW].item() == pytest.approx(1 / 6)  # only (A<0, rho=0.5)
    assert stats[L.CLIPFRAC_HIGH].item() == pytest.approx(1 / 6)  # only (A>0, rho=1.5)
    assert stats[L.RATIO_MEAN].item() == pytest.approx(1.0)  # (0.5 + 1 + 1.5) * 2 / 6
    assert stats[L.RATIO_MAX].item() == pytest.approx(1.5)
    # k3 = rho - 1 - log rho: 0.5 -> 0.1931472, 1 -> 0, 1.5 -> 0.0945349; mean over 6 = 0.2876821 / 3
    assert stats[L.APPROX_KL].item() == pytest.approx((0.5 - 1 + math.log(2) + 0.5 - math.log(1.5)) / 3)
    assert stats[L.NUM_TOKENS].item() == 6
    assert stats[L.LOSS_POLICY].item() == pytest.approx(3.82 / 6)
    assert L.LOSS_KL_REF not in stats and L.ENTROPY not in stats
    assert all(not value.requires_grad for value in stats.values())


def test_gradient_is_zero_exactly_where_a_clip_is_active():
    logprobs, old, adv, mask = _table()
    loss, _ = grpo_loss(logprobs, old, adv, mask)
    loss.backward()
    # d loss / d logp = -rho*A / 6 where unclipped, 0 where clipped (see _table)
    expected = torch.tensor([[-0.5, -1.0, 0.0], [0.0, 2.0, 3.0]], dtype=torch.float64) / 6
    torch.testing.assert_close(logprobs.grad, expected)


def test_mask_excludes_tokens_and_accepts_bool():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)  # drop (A=-2, rho=1.5): loss 3
    logprobs, old, adv, _ = _table()
    loss, stats = grpo_loss(logprobs, old, adv, mask)
    assert loss.item() == pytest.approx(0.82 / 5)  # (3.82 - 3) / 5 tokens
    assert stats[L.CLIPFRAC_LOW].item() == pytest.approx(1 / 5)
    assert stats[L.RATIO_MAX].item() == pytest.approx(1.5)  # row 0 still holds 1.5
    loss_bool, _ = grpo_loss(logprobs, old, adv, mask.bool())
    assert loss_bool.item() == pytest.approx(loss.item())
    loss.backward()
    assert logprobs.grad[1, 2].item() == 0.0


def test_sequence_aggregation_means_per_row_first():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    logprobs, old, adv, _ = _table()
    loss, _ = grpo_loss(logprobs, old, adv, mask, aggregation="sequence")
    # row 0: (-0.5 - 1 - 1.28) / 3 = -0.926667;  row 1: (1.6 + 2) / 2 = 1.8;  mean = 0.436667
    assert loss.item() == pytest.approx((-2.78 / 3 + 1.8) / 2)


def test_global_normalisers_make_split_batches_sum_to_the_whole():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    logprobs, old, adv, _ = _table()
    for aggregation, key in (("token", "num_tokens"), ("sequence", "num_sequences")):
        whole, _ = grpo_loss(logprobs, old, adv, mask, aggregation=aggregation)
        (whole_grad,) = torch.autograd.grad(whole, logprobs)
        total = mask.sum() if key == "num_tokens" else 2
        pieces = [grpo_loss(logprobs[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                            aggregation=aggregation, **{key: total})[0] for i in range(2)]
        (piece_grad,) = torch.autograd.grad(pieces[0] + pieces[1], logprobs)
        assert (pieces[0] + pieces[1]).item() == pytest.approx(whole.item())
        torch.testing.assert_close(piece_grad, whole_grad)
    # An explicit normaliser is used as given: 3.82 / 10 over the unmasked table.
    loss, _ = grpo_loss(*_table(), num_tokens=10)
    assert loss.item() == pytest.approx(0.382)


def test_k3_kl_to_reference():
    logprobs = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 2)
    ref = torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64)
    loss, stats = grpo_loss(logprobs, old, adv, mask, kl_coef=0.5, ref_logprobs=ref)
    # pg = -1 per token; kl token 0 = exp(log2) - log2 - 1 = 0.3068528, token 1 = 0
    # loss = (-1 + 0.5 * 0.3068528 - 1) / 2 = -0.9232868
    assert loss.item() == pytest.approx((-2 + 0.5 * (1 - math.log(2))) / 2)
    assert stats[L.LOSS_KL_REF].item() == pytest.approx((1 - math.log(2)) / 2)
    assert stats[L.LOSS_POLICY].item() == pytest.approx(-1.0)
    loss.backward()
    # d kl / d logp = 1 - exp(ref - logp) = -1 at token 0; grad = (-1 + 0.5 * -1) / 2, then -1 / 2
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.75, -0.5]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_masked_token_far_from_the_reference_leaves_the_loss_finite(dtype):
    """A masked position (an environment token, padding) where the policy lies 95 nats below the reference: the
    k3 term's exp overflows there in float32 and inf * 0 made the loss and the whole gradient NaN."""
    logprobs = torch.tensor([[-0.5, -100.0]], dtype=dtype, requires_grad=True)
    old = torch.tensor([[-0.6, 0.0]], dtype=dtype)
    ref = torch.tensor([[-0.55, -5.0]], dtype=dtype)
    adv, mask = torch.tensor([1.0], dtype=dtype), torch.tensor([[1.0, 0.0]])
    loss, stats = grpo_loss(logprobs, old, adv, mask, kl_coef=0.01, ref_logprobs=ref)
    loss.backward()
    # the masked column contributes nothing: rho = exp(0.1) within the clip, kl = exp(-0.05) + 0.05 - 1
    rho, kl = math.exp(0.1), math.exp(-0.05) + 0.05 - 1
    assert loss.item() == pytest.approx(-rho + 0.01 * kl, rel=1e-6)
    assert stats[L.LOSS_KL_REF].item() == pytest.approx(kl, rel=1e-4)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-rho + 0.01 * (1 - math.exp(-0.05)), 0.0]], dtype=dtype))


def test_kl_off_ignores_reference_and_kl_on_requires_it():
    logprobs, old, adv, mask = _table()
    plain, _ = grpo_loss(logprobs, old, adv, mask)
    with_ref, stats = grpo_loss(logprobs, old, adv, mask, ref_logprobs=torch.zeros(2, 3, dtype=torch.float64))
    assert with_ref.item() == plain.item() and L.LOSS_KL_REF not in stats
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, old, adv, mask, kl_coef=0.1)


def test_entropy_is_reported_as_masked_mean():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], dtype=torch.float64)
    _, stats = grpo_loss(*_table(mask), entropy=entropy)
    assert stats[L.ENTROPY].item() == pytest.approx(15 / 5)  # 100 is masked out


def test_no_gradient_flows_into_old_logprobs():
    logprobs, old, adv, mask = _table()
    old.requires_grad_(True)
    loss, _ = grpo_loss(logprobs, old, adv, mask)
    loss.backward()
    assert old.grad is None


def test_empty_mask_gives_zero_loss_not_nan():
    logprobs, old, adv, _ = _table()
    loss, stats = grpo_loss(logprobs, old, adv, torch.zeros(2, 3))
    assert loss.item() == 0.0 and stats[L.RATIO_MAX].item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"aggregation": "mean"}, "aggregation"), ({"eps_low": 1.0}, "eps_low"), ({"kl_coef": -1.0}, "kl_coef"),
     ({"num_tokens": 0}, "num_tokens")],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grpo_loss(*_table(), **kwargs)


def test_shape_mismatch_names_the_tensor():
    logprobs, old, adv, mask = _table()
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logprobs, old, adv[:1], mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logprobs, old, adv, mask[:, :2])


def test_decoupled_ppo_weights_each_token_by_the_truncated_proximal_over_behaviour_ratio():
    """old = 0 (the learner's recomputed log-probs), behaviour log-probs log([[0.5, 2, 1], [0.25, 1, 4]]):
    weights exp(old - behaviour) = [[2, 0.5, 1], [4, 1, 0.25]], truncated at 1.5 to [[1.5, 0.5, 1], [1.5, 1, 0.25]].
    The table's per-token losses [[-0.5, -1, -1.28], [1.6, 2, 3]] become [[-0.75, -0.5, -1.28], [2.4, 2, 0.75]]:
    sum 2.62 over 6 tokens; the gradients [[-0.5, -1, 0], [0, 2, 3]] / 6 scale alike."""
    logprobs, old, adv, mask = _table()
    behaviour = torch.log(torch.tensor([[0.5, 2.0, 1.0], [0.25, 1.0, 4.0]], dtype=torch.float64))
    loss, stats = grpo_loss(logprobs, old, adv, mask, behaviour_logprobs=behaviour, behaviour_weight_cap=1.5)
    assert loss.item() == pytest.approx(2.62 / 6)
    loss.backward()
    expected = torch.tensor([[-0.75, -0.5, 0.0], [0.0, 2.0, 0.75]], dtype=torch.float64) / 6
    assert torch.allclose(logprobs.grad, expected)
    assert stats[L.BEHAVIOUR_WEIGHT_MEAN].item() == pytest.approx(5.75 / 6)
    assert stats[L.BEHAVIOUR_WEIGHT_CAPPED].item() == pytest.approx(2 / 6)
    assert stats[L.RATIO_MEAN].item() == pytest.approx(1.0)  # the ratio itself is to the recomputed log-probs


def test_decoupled_ppo_ignores_masked_tokens_and_needs_both_arguments():
    logprobs, old, adv, mask = _table()
    mask[1, 2] = 0.0
    behaviour = torch.zeros(2, 3, dtype=torch.float64)
    behaviour[1, 2] = -1e4  # a masked token's weight would be exp(1e4): never computed
    loss, stats = grpo_loss(logprobs, old, adv, mask, behaviour_logprobs=behaviour, behaviour_weight_cap=2.0)
    assert loss.item() == pytest.approx((-0.5 - 1 - 1.28 + 1.6 + 2) / 5)
    assert stats[L.BEHAVIOUR_WEIGHT_MEAN].item() == 1.0 and stats[L.BEHAVIOUR_WEIGHT_CAPPED].item() == 0.0
    with pytest.raises(ValueError, match="go together"):
        grpo_loss(logprobs, old, adv, mask, behaviour_logprobs=behaviour)
    with pytest.raises(ValueError, match="behaviour_weight_cap must be >= 1"):
        grpo_loss(logprobs, old, adv, mask, behaviour_logprobs=behaviour, behaviour_weight_cap=0.5)


# ---------------------------------------------------------------- SFT cross-entropy


def test_sft_loss_hand_computed():
    from learner.loss import SFT_NLL, sft_loss

    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.5]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss, stats = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx((2.0 + 3.0 + 0.5) / 3)
    assert stats[SFT_NLL].item() == pytest.approx(5.5 / 3) and stats[L.NUM_TOKENS].item() == 3
    # A global normaliser: the two rows as separate pieces sum to the whole batch's loss.
    first, _ = sft_loss(logprobs[:1], mask[:1], num_tokens=3)
    second, _ = sft_loss(logprobs[1:], mask[1:], num_tokens=3)
    assert (first + second).item() == pytest.approx(loss.item())


def test_sft_loss_gradient_is_minus_mask_over_tokens():
    from learner.loss import sft_loss

    logprobs = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    sft_loss(logprobs, mask)[0].backward()
    torch.testing.assert_close(logprobs.grad, -mask / 3)


def test_sft_loss_rejects_mismatched_shapes():
    from learner.loss import sft_loss

    with pytest.raises(ValueError, match="differ"):
        sft_loss(torch.zeros(2, 3), torch.ones(2, 2))
