"""PPO clipped policy loss with an optional KL loss to the reference policy (§4), and the
decoupled (off-policy) form for rollouts sampled by older weights (§4, "Off-policy rollouts").

Conventions follow EasyR1/veRL: log-probs are per response token, ``(B, L)``; the mask is
1 on response tokens; the per-token loss is averaged over the micro-batch's masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shuffle_r1.config import KL_TYPES, LOSS_AGG_MODES

# Log-ratios are clamped before exp, as in EasyR1, so one stale token cannot overflow.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class PolicyLossOutput:
    """Policy loss of one micro-batch and its metrics (docs/algorithm.md §4).

    Attributes:
        loss: scalar to back-propagate, ``pg_loss + kl_coef * kl`` (KL only if kl_coef > 0).
        pg_loss: scalar clipped-surrogate loss, detached.
        kl: scalar KL loss to the reference policy (detached); 0 if no ``ref_logprobs``.
        clip_fraction: scalar share of masked tokens where the clipped term was taken.
        approx_kl: scalar mean of ``old_logprobs - logprobs`` over masked tokens (nats).
        behaviour_imp_weight: scalar mean over masked tokens of the truncated importance
            weight ``w`` of the decoupled loss (detached); 1.0 without ``behaviour_logprobs``.
        behaviour_truncated_fraction: scalar share of masked tokens whose weight was
            truncated to ``behaviour_imp_cap`` (detached); 0.0 without ``behaviour_logprobs``.
    """

    loss: Tensor
    pg_loss: Tensor
    kl: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    behaviour_imp_weight: Tensor
    behaviour_truncated_fraction: Tensor


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_type: str = "low_var_kl") -> Tensor:
    """Per-token KL estimate between the policy and the reference policy (nats), veRL's names
    (``verl/trainer/ppo/core_algos.py``, ``kl_penalty``) for J. Schulman's estimators of
    KL(π‖π_ref) from samples of π ("Approximating KL Divergence", 2020):

    - ``low_var_kl`` / ``k3``: ``exp(ref - logp) - (ref - logp) - 1``, clamped to
      [-10, 10] (its log-ratio to ±20); unbiased, ≥ 0, low variance;
    - ``kl`` / ``k1``: ``logp - ref``, unbiased; ``mse`` / ``k2``: ``0.5 (logp - ref)²``;
      ``abs``: ``|logp - ref|``.

    ``logprobs``, ``ref_logprobs``: ``(B, L)``; returns ``(B, L)``.

    Raises:
        ValueError: unknown ``kl_type``.
    """
    if kl_type in ("low_var_kl", "k3"):
        kl = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (kl.exp() - kl - 1).clamp(-10.0, 10.0)
    if kl_type in ("kl", "k1"):
        return logprobs - ref_logprobs
    if kl_type == "abs":
        return (logprobs - ref_logprobs).abs()
    if kl_type in ("mse", "k2"):
        return 0.5 * (logprobs - ref_logprobs).square()
    raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")


def masked_mean(values: Tensor, mask: Tensor, loss_agg_mode: str = "token-mean") -> Tensor:
    """Average ``values`` ``(B, L)`` over the tokens where ``mask`` ``(B, L)`` is 1.

    ``token-mean``: sum over masked tokens / number of masked tokens. ``seq-mean-token-mean``:
    mean over the sequences that have at least one masked token of their token means. No
    masked token at all gives 0, still attached to the graph (a zero gradient, not NaN).

    Raises:
        ValueError: unknown ``loss_agg_mode``.
    """
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    if loss_agg_mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-mean":
        tokens = mask.sum(dim=1)
        seq_means = masked.sum(dim=1) / tokens.clamp(min=1)
        return seq_means.sum() / (tokens > 0).sum().clamp(min=1)
    raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    loss_agg_mode: str = "token-mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    behaviour_logprobs: Tensor | None = None,
    behaviour_imp_cap: float = 5.0,
) -> PolicyLossOutput:
    """PPO clipped surrogate, token level, plus ``kl_coef`` × KL to the reference (§4).

    Per token: ``ratio = exp(logp - logp_old)`` (log-ratio clamped to ±20, as in EasyR1) and
    ``loss = -min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A)``, averaged by
    ``loss_agg_mode`` (see :func:`masked_mean`). An empty mask gives a loss of 0 that is
    still differentiable (zero gradient), so a micro-batch of padding cannot produce NaN.

    Decoupled PPO objective (with ``behaviour_logprobs``): for rollouts that older weights
    sampled (an asynchronous run), the policy that clips the step, the *proximal* policy, is
    ``old_logprobs`` — recomputed under the learner's weights at the start of the step —
    and the *behaviour* policy is the rollout engine's sampling log-probs. Each token's
    clipped term above is multiplied by the truncated importance weight

        ``w = min(exp(logp_old - logp_behaviour), behaviour_imp_cap)``

    (log-ratio clamped to ±20, detached, so ``w`` only scales the token's gradient):

        ``loss = w · max(-A · ratio, -A · clip(ratio, 1 - ε_low, 1 + ε_high))``.

    This is the decoupled PPO objective of Hilton, Cobbe & Schulman, "Batch size-invariance
    for policy optimization" (NeurIPS 2022, arXiv:2110.00641), as AReaL uses it (Fu et al.,
    "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language
    Reasoning", 2025, arXiv:2505.24298, eq. 5). One departure: AReaL masks out a token
    whose weight exceeds its cap; here the weight is *truncated* to the cap (issue #21), so
    such a token still counts, with weight ``behaviour_imp_cap``. The KL term is not
    weighted. Without ``behaviour_logprobs`` the loss is bit for bit the on-policy one
    above.

    Args:
        logprobs: ``(B, L)`` log-probs of the response tokens under the current policy
            (nats, with grad).
        old_logprobs: ``(B, L)`` log-probs under the policy that generated / was current
            when the batch was drawn (no grad taken).
        advantages: ``(B,)`` one per sequence, broadcast to its tokens, or ``(B, L)``.
        response_mask: ``(B, L)`` 1 on response tokens, 0 on padding (bool or numeric).
        clip_ratio_low, clip_ratio_high: ε_low ∈ [0, 1), ε_high ≥ 0.
        loss_agg_mode: ``"token-mean"`` or ``"seq-mean-token-mean"``.
        ref_logprobs: ``(B, L)`` reference-policy log-probs, needed when ``kl_coef > 0``;
            if given with ``kl_coef == 0`` the KL is only reported.
        kl_coef: coefficient of the KL loss, ≥ 0.
        kl_type: see :func:`kl_penalty`.
        behaviour_logprobs: ``(B, L)`` log-probs (nats) the rollout engine sampled the
            response tokens with (the behaviour policy), or None for on-policy rollouts.
        behaviour_imp_cap: the truncation of ``w``, ≥ 1 (used only with
            ``behaviour_logprobs``).

    Returns:
        :class:`PolicyLossOutput`.

    Raises:
        ValueError: a shape does not match (the shapes are named), the mask holds values
            other than 0/1, a clip ratio, ``kl_coef`` or ``behaviour_imp_cap`` is out of
            range, ``kl_coef > 0`` without ``ref_logprobs``, or an unknown mode / KL type.
    """
    shape = tuple(logprobs.shape)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape (batch, length), got {shape}")
    named = {"old_logprobs": old_logprobs, "response_mask": response_mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    if behaviour_logprobs is not None:
        named["behaviour_logprobs"] = behaviour_logprobs
    for name, tensor in named.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs has {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages must have shape {shape[:1]} or {shape}, got {tuple(advantages.shape)}"
        )
    if not ((response_mask == 0) | (response_mask == 1)).all():
        raise ValueError("response_mask must hold only 0 and 1")
    if not (0.0 <= clip_ratio_low < 1.0 and clip_ratio_high >= 0.0):
        raise ValueError(
            f"clip ratios must satisfy 0 <= low < 1 and high >= 0, "
            f"got low={clip_ratio_low}, high={clip_ratio_high}"
        )
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logprobs, got None")
    if not behaviour_imp_cap >= 1.0:
        raise ValueError(f"behaviour_imp_cap must be >= 1, got {behaviour_imp_cap}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")

    mask = response_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.detach()
    old_logprobs = old_logprobs.detach()
    ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    clipped_ratio = ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    per_token = torch.maximum(unclipped_loss, clipped_loss)
    if behaviour_logprobs is not None:
        log_w = old_logprobs - behaviour_logprobs.detach()
        imp_weight = log_w.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
        truncated = imp_weight > behaviour_imp_cap
        imp_weight = imp_weight.clamp(max=behaviour_imp_cap)
        per_token = imp_weight * per_token
    pg_loss = masked_mean(per_token, mask, loss_agg_mode)
    loss = pg_loss

    kl = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    if ref_logprobs is not None:
        per_token_kl = kl_penalty(logprobs, ref_logprobs.detach(), kl_type)
        kl_loss = masked_mean(per_token_kl, mask, loss_agg_mode)
        kl = kl_loss.detach()
        if kl_coef > 0:
            loss = pg_loss + kl_coef * kl_loss

    with torch.no_grad():
        clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(ratio.dtype), mask)
        approx_kl = masked_mean(old_logprobs - logprobs, mask)
        if behaviour_logprobs is None:
            imp_weight_mean = torch.ones_like(approx_kl)
            truncated_fraction = torch.zeros_like(approx_kl)
        else:
            imp_weight_mean = masked_mean(imp_weight, mask)
            truncated_fraction = masked_mean(truncated.to(imp_weight.dtype), mask)
    return PolicyLossOutput(
        loss=loss,
        pg_loss=pg_loss.detach(),
        kl=kl,
        clip_fraction=clip_fraction,
        approx_kl=approx_kl,
        behaviour_imp_weight=imp_weight_mean,
        behaviour_truncated_fraction=truncated_fraction,
    )
