"""PPO clipped policy loss and KL loss, docs/algorithm.md §4, against hand-written float64 loops."""

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
