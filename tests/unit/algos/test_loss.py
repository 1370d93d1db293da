"""PPO clipped policy loss and KL loss, docs/algorithm.md §4, against hand-written float64 loops;
the decoupled loss of off-policy rollouts (§4, "Off-policy rollouts") against values by hand
and a plain per-token re-implementation, values and autograd gradients."""

import math
import re

import pytest
import torch

from shuffle_r1.algos import policy_loss


def reference_kl(logp, ref, kl_type):
    kl_type = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}.get(kl_type, kl_type)
    if kl_type == "low_var_kl":
        kl = max(-20.0, min(20.0, ref - logp))
        return max(-10.0, min(10.0, math.exp(kl) - kl - 1))
    return {"kl": logp - ref, "abs": abs(logp - ref), "mse": 0.5 * (logp - ref) ** 2}[kl_type]


def reference_loss(logp, old, adv, mask, low, high, mode, ref=None, kl_coef=0.0, kl_type=""):
    """Plain loops over nested lists; returns (loss, pg_loss, kl, clip_fraction, approx_kl)."""
    pg_sum = kl_sum = clipped = approx = 0.0
    tokens = 0
    seq_pg, seq_kl = [], []
    for b in range(len(logp)):
        s_pg = s_kl = 0.0
        s_tokens = 0
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
            ratio = math.exp(logp[b][t] - old[b][t])
            clip = min(max(ratio, 1 - low), 1 + high)
            token_loss = -min(ratio * a, clip * a)
            clipped += -clip * a > -ratio * a
            approx += old[b][t] - logp[b][t]
            token_kl = reference_kl(logp[b][t], ref[b][t], kl_type) if ref else 0.0
            s_pg, s_kl, s_tokens = s_pg + token_loss, s_kl + token_kl, s_tokens + 1
        pg_sum, kl_sum, tokens = pg_sum + s_pg, kl_sum + s_kl, tokens + s_tokens
        if s_tokens:
            seq_pg.append(s_pg / s_tokens)
            seq_kl.append(s_kl / s_tokens)
    if mode == "token-mean":
        pg, kl = pg_sum / tokens, kl_sum / tokens
    else:
        pg, kl = sum(seq_pg) / len(seq_pg), sum(seq_kl) / len(seq_kl)
    return pg + kl_coef * kl, pg, kl, clipped / tokens, approx / tokens


def random_batch(seed, batch=5, length=7, token_advantages=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.4
    ref = logp + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.5
    shape = (batch, length) if token_advantages else (batch,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("kl_type", ["low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2"])
@pytest.mark.parametrize(("low", "high"), [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("token_advantages", [False, True])
def test_matches_hand_written_loops(mode, kl_type, low, high, token_advantages):
    logp, old, adv, mask, ref = random_batch(3, token_advantages=token_advantages)
    logp.requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, low, high, mode, ref, kl_coef=0.1, kl_type=kl_type)
    expected = reference_loss(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), low, high, mode,
        ref.tolist(), 0.1, kl_type,
    )  # fmt: skip
    got = [out.loss, out.pg_loss, out.kl, out.clip_fraction, out.approx_kl]
    assert [x.item() for x in got] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0 < out.clip_fraction.item() < 1  # the data clips some tokens, not all
    assert out.loss.requires_grad
    assert not any(x.requires_grad for x in got[1:])


def test_clipping_on_both_sides_by_hand():
    # tokens: A>0 ratio 1.5 (clipped high), A<0 ratio 0.5 (clipped low),
    #         A<0 ratio 1.5 (not clipped), A>0 ratio 0.5 (not clipped)
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    out = policy_loss(logp, old, adv, torch.ones(1, 4))
    # per token: -min(1.5, 1.2) = -1.2; -min(-0.5, -0.8) = 0.8; 1.5; -min(0.5, 0.8) = -0.5
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 + 1.5 - 0.5) / 4)
    assert out.clip_fraction.item() == 0.5
    out.loss.backward()
    # d/dlogp of -A·ratio is -A·ratio; clipped tokens give none
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, 1.5 / 4, -0.5 / 4])


def test_clip_higher_widens_only_the_upper_side():
    logp = torch.tensor([[math.log(1.25), math.log(0.75)]])
    adv = torch.tensor([[1.0, -1.0]])
    out = policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), 0.2, 0.28)
    assert out.pg_loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert out.clip_fraction.item() == 0.5


def test_sequence_advantages_broadcast_to_tokens():
    logp, old, adv, mask, _ = random_batch(5)
    per_token = adv[:, None].expand_as(logp)
    for mode in ("token-mean", "seq-mean-token-mean"):
        a = policy_loss(logp, old, adv, mask, loss_agg_mode=mode).loss
        b = policy_loss(logp, old, per_token, mask, loss_agg_mode=mode).loss
        assert a.item() == b.item()


def test_modes_differ_on_unequal_lengths():
    logp = torch.zeros(2, 3)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([1.0, -3.0])
    token = policy_loss(logp, old, adv, mask, loss_agg_mode="token-mean").loss.item()
    seq = policy_loss(logp, old, adv, mask, loss_agg_mode="seq-mean-token-mean").loss.item()
    assert token == pytest.approx((-1 * 3 + 3) / 4)
    assert seq == pytest.approx((-1 + 3) / 2)


def test_padding_does_not_change_the_loss():
    logp, old, adv, mask, ref = random_batch(9)
    base = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.5)
    pad = mask == 0
    noisy = [x.masked_fill(pad, 7.0) for x in (logp, old, ref)]
    other = policy_loss(noisy[0], noisy[1], adv, mask, ref_logprobs=noisy[2], kl_coef=0.5)
    assert other.loss.item() == base.loss.item()


def test_sequence_without_tokens_is_left_out_of_seq_mean():
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [0, 0]])
    out = policy_loss(logp, logp, torch.tensor([2.0, 5.0]), mask,
                      loss_agg_mode="seq-mean-token-mean")  # fmt: skip
    assert out.loss.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_empty_mask_gives_zero_loss_with_a_gradient(mode):
    logp = torch.randn(2, 3, requires_grad=True)
    out = policy_loss(logp, torch.randn(2, 3), torch.randn(2), torch.zeros(2, 3),
                      loss_agg_mode=mode, ref_logprobs=torch.randn(2, 3), kl_coef=0.1)  # fmt: skip
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_kl_added_only_with_positive_coefficient():
    logp, old, adv, mask, ref = random_batch(11)
    without = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.0)
    with_kl = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.25)
    assert without.loss.item() == without.pg_loss.item()
    assert without.kl.item() > 0  # reported even when not added
    assert with_kl.loss.item() == pytest.approx(with_kl.pg_loss.item() + 0.25 * with_kl.kl.item())
    assert policy_loss(logp, old, adv, mask).kl.item() == 0.0


def test_low_var_kl_is_clamped():
    logp = torch.tensor([[-30.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0]])
    out = policy_loss(logp, logp, torch.zeros(1), torch.tensor([[1, 0]]),
                      ref_logprobs=ref, kl_coef=1.0)  # fmt: skip
    assert out.kl.item() == 10.0


def test_kl_gradient_flows_to_logprobs_only():
    logp, old, adv, mask, ref = random_batch(13)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    old.requires_grad_(True)
    policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1).loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and ref.grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"old_logprobs": torch.zeros(2, 4)}, "old_logprobs has shape (2, 4), logprobs has (2, 3)"),
        ({"response_mask": torch.ones(3, 3)}, "response_mask has shape (3, 3)"),
        ({"ref_logprobs": torch.zeros(2)}, "ref_logprobs has shape (2,)"),
        ({"advantages": torch.zeros(3)}, "advantages must have shape (2,) or (2, 3), got (3,)"),
        ({"logprobs": torch.zeros(6)}, "logprobs must have shape (batch, length), got (6,)"),
        ({"response_mask": torch.full((2, 3), 2)}, "only 0 and 1"),
        ({"kl_coef": 0.1}, "needs ref_logprobs"),
        ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
        ({"clip_ratio_low": 1.0}, "clip ratios"),
        ({"loss_agg_mode": "seq-mean"}, "loss_agg_mode must be one of"),
        ({"kl_type": "k4"}, "kl_type must be one of"),
        (
            {"behaviour_logprobs": torch.zeros(2, 4)},
            "behaviour_logprobs has shape (2, 4), logprobs has (2, 3)",
        ),
        ({"behaviour_imp_cap": 0.99}, "behaviour_imp_cap must be >= 1, got 0.99"),
        ({"behaviour_imp_cap": math.nan}, "behaviour_imp_cap must be >= 1, got nan"),
    ],
)
def test_invalid_inputs_are_named(kwargs, match):
    args = {
        "logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "response_mask": torch.ones(2, 3),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(match)):
        policy_loss(**args)


# -- the decoupled loss of off-policy rollouts (§4, "Off-policy rollouts") -------------------


def test_decoupled_loss_by_hand():
    """Proximal log-probs 0, so ratio = p and w = exp(-logp_behaviour), cap 5:

    token  ratio  A   clipped surrogate  w              loss
    0      1.0    +1  -1.0               0.5            -0.5
    1      1.5    +1  -1.2 (clipped)     2.0            -2.4
    2      1.0    -1  +1.0               8.0 -> 5.0     +5.0   (truncated)
    3      0.9    +1  -0.9               1.0            -0.9
    4      masked; its behaviour log-prob would give w = e^20 (clamped), and counts nowhere
    """
    logp = torch.tensor([[1.0, 1.5, 1.0, 0.9, 1.0]], dtype=torch.float64).log()
    logp.requires_grad_(True)
    old = torch.zeros(1, 5, dtype=torch.float64)
    behaviour = torch.tensor([[2.0, 0.5, 0.125, 1.0, 1e-30]], dtype=torch.float64).log()
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = policy_loss(logp, old, adv, mask, behaviour_logprobs=behaviour, behaviour_imp_cap=5.0)
    assert out.loss.item() == pytest.approx((-0.5 - 2.4 + 5.0 - 0.9) / 4)
    assert out.behaviour_imp_weight.item() == pytest.approx((0.5 + 2.0 + 5.0 + 1.0) / 4)
    assert out.behaviour_truncated_fraction.item() == 0.25
    assert out.clip_fraction.item() == 0.25  # token 1, as without the weights
    out.loss.backward()
    # d/dlogp of -w·A·ratio is -w·A·ratio; the clipped token 1 and the masked token 4 give none
    assert logp.grad[0].tolist() == pytest.approx([-0.5 / 4, 0.0, 5.0 / 4, -0.9 / 4, 0.0])


def reference_decoupled(logp, old, behaviour, adv, mask, low, high, cap, mode):
    """The decoupled loss written out token by token in torch scalars (autograd flows to
    ``logp``): w = min(exp(old - behaviour), cap), loss = w · max(-A·r, -A·clip(r)), r =
    exp(logp - old); aggregated by ``mode``."""
    seq_losses, token_losses = [], []
    for b in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            ratio = torch.exp(logp[b, t] - old[b, t])
            clipped = torch.clamp(ratio, 1 - low, 1 + high)
            w = min(math.exp(float(old[b, t] - behaviour[b, t])), cap)
            row.append(w * torch.maximum(-a * ratio, -a * clipped))
        token_losses += row
        if row:
            seq_losses.append(sum(row) / len(row))
    if mode == "token-mean":
        return sum(token_losses) / len(token_losses)
    return sum(seq_losses) / len(seq_losses)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(("low", "high"), [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("token_advantages", [False, True])
def test_decoupled_loss_and_gradient_equal_a_plain_re_implementation(
    mode, low, high, token_advantages
):
    logp, old, adv, mask, _ = random_batch(17, token_advantages=token_advantages)
    g = torch.Generator().manual_seed(18)
    behaviour = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 0.8
    cap = 1.6
    logp.requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, low, high, mode,
                      behaviour_logprobs=behaviour, behaviour_imp_cap=cap)  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, logp)
    want = reference_decoupled(logp, old, behaviour, adv, mask, low, high, cap, mode)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)
    w = (old - behaviour).exp()[mask.bool()]
    assert out.behaviour_imp_weight.item() == pytest.approx(w.clamp(max=cap).mean().item())
    truncated = (w > cap).double().mean().item()
    assert out.behaviour_truncated_fraction.item() == truncated
    assert 0 < truncated < 1  # the data truncates some tokens, not all
    # the weights change the loss: not the on-policy one
    assert out.loss.item() != policy_loss(logp, old, adv, mask, low, high, mode).loss.item()


def on_policy_loss_before_issue_21(logp, old, adv, mask):
    """policy_loss's token-mean surrogate as it was before the decoupled loss, op for op."""
    ratio = (logp - old).clamp(-20.0, 20.0).exp()
    clipped = ratio.clamp(0.8, 1.2)
    per_token = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * clipped)
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    return masked.sum() / mask.sum().clamp(min=1)


def test_without_behaviour_logprobs_the_loss_is_bit_identical():
    logp, old, adv, mask, _ = random_batch(19)
    logp.requires_grad_(True)
    out = policy_loss(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(out.loss, logp)
    want = on_policy_loss_before_issue_21(logp, old, adv, mask)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert torch.equal(out.loss.detach(), want.detach()) and torch.equal(grad, want_grad)
    assert out.behaviour_imp_weight.item() == 1.0
    assert out.behaviour_truncated_fraction.item() == 0.0
    # behaviour = proximal gives w = 1 exactly: the same bits again
    same = policy_loss(logp, old, adv, mask, behaviour_logprobs=old.clone())
    assert torch.equal(same.loss.detach(), want.detach())
    assert same.behaviour_imp_weight.item() == 1.0


def test_behaviour_weights_are_detached_and_clamped():
    logp, old, adv, mask, _ = random_batch(21)
    behaviour = (old - 50.0).requires_grad_(True)  # w = e^50: clamped to e^20, then capped
    logp.requires_grad_(True)
    out = policy_loss(logp, old, adv, mask, behaviour_logprobs=behaviour, behaviour_imp_cap=1e12)
    out.loss.backward()
    assert behaviour.grad is None and torch.isfinite(logp.grad).all()
    assert out.behaviour_imp_weight.item() == pytest.approx(math.exp(20.0))
    assert out.behaviour_truncated_fraction.item() == 0.0  # e^20 < 1e12: clamped, not capped


def test_padding_does_not_change_the_decoupled_loss():
    logp, old, adv, mask, _ = random_batch(23)
    behaviour = old - 0.7
    base = policy_loss(logp, old, adv, mask, behaviour_logprobs=behaviour, behaviour_imp_cap=1.5)
    pad = mask == 0
    noisy_logp, noisy_old = (x.masked_fill(pad, -40.0) for x in (logp, old))
    noisy_behaviour = behaviour.masked_fill(pad, 40.0)
    other = policy_loss(noisy_logp, noisy_old, adv, mask,
                        behaviour_logprobs=noisy_behaviour, behaviour_imp_cap=1.5)  # fmt: skip
    assert other.loss.item() == base.loss.item()
    assert other.behaviour_imp_weight.item() == base.behaviour_imp_weight.item() == 1.5
    assert other.behaviour_truncated_fraction.item() == 1.0
