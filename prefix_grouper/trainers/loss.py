"""The clipped policy-gradient loss of GRPO-style trainers, with TRL's aggregations."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_choice, check_finite_real, check_positive_real, check_real

__all__ = ["LOSS_NORMALIZERS", "LOSS_TYPES", "micro_batch_share", "policy_loss"]

# What each loss type divides the masked sum of per-token losses by, the one table of them:
# "rows", a mean over the batch's sequences (grpo: of each sequence's token mean; dr_grpo: of
# each sequence's sum over a constant length); "tokens", the batch's active tokens (bnpo);
# "given", a constant for the whole global batch, num_items_in_batch (dapo). policy_loss
# aggregates by it, and micro_batch_share weights the parts of a split batch by it.
LOSS_NORMALIZERS = {"grpo": "rows", "bnpo": "tokens", "dr_grpo": "rows", "dapo": "given"}
LOSS_TYPES = tuple(LOSS_NORMALIZERS)


def micro_batch_share(loss_type: str, rows: float, tokens: float, rows_total: float, tokens_total: float) -> float:
    """Weight of one micro-batch's :func:`policy_loss` (``rows`` sequences with ``tokens``
    active tokens, of ``rows_total`` and ``tokens_total`` in the whole batch) such that the
    weighted sum over micro-batches is the loss of the whole batch. dapo's is 1: every part
    already divides by the whole batch's ``num_items_in_batch``."""
    check_choice(loss_type, "loss_type", LOSS_TYPES)
    normalizer = LOSS_NORMALIZERS[loss_type]
    if normalizer == "rows":
        return rows / max(rows_total, 1.0)
    if normalizer == "tokens":
        return tokens / max(tokens_total, 1.0)
    return 1.0


def _check_per_token(x: Any, name: str, shape: torch.Size, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor [N, S], got {kind}")
    if x.shape != shape:
        raise ValueError(f"{name} must have the shape of log_probs {tuple(shape)} ([N, S]), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but log_probs is on {device}")


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_log_probs: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss with asymmetric clipping and a k3 KL penalty, aggregated as TRL 1.16 does.

    Per token, with ``rho = exp(log_probs - old_log_probs)``::

        l = -min(rho * A, clip(rho, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * kl
        kl = exp(ref - log_probs) - (ref - log_probs) - 1

    Args:
        log_probs: ``[N, S]`` log-probs of the completion tokens under the current policy.
        old_log_probs: ``[N, S]`` under the policy that sampled them; None means
            ``log_probs.detach()`` (one update per rollout batch: rho = 1, gradient A).
        advantages: ``[N]`` (broadcast over the tokens) or ``[N, S]``.
        mask: ``[N, S]`` bool, True on real completion tokens.
        loss_type: ``"grpo"``: token mean per sequence, then mean over sequences;
            ``"bnpo"``: sum / active tokens of this batch; ``"dr_grpo"``: sum /
            (N * max_completion_length); ``"dapo"``: sum / num_items_in_batch.
        ref_log_probs: ``[N, S]`` under the reference policy; required when beta > 0.
        beta: weight of the KL penalty (>= 0).
        max_completion_length: dr_grpo's constant; default S.
        num_items_in_batch: dapo's denominator, the active tokens of the global batch
            (>= 0; like TRL, values below 1 count as 1); default this batch's active tokens.
        epsilon_low, epsilon_high: the clip range ``[1 - epsilon_low, 1 + epsilon_high]``;
            both >= 0 and ``epsilon_low <= 1`` (a ratio is never negative).

    The loss is computed in float32 (float64 for float64 log-probs): every input is upcast to
    that dtype first, as TRL keeps the loss in float32 whatever the model's dtype.

    A batch without active tokens (``mask`` all False, including N = 0 or S = 0) gives a loss
    of exactly 0 on every loss type (with a zero gradient), and statistics of 0.

    Returns ``(loss, stats)``: a scalar loss and detached scalar statistics, token means
    over the mask:

    - ``clip_frac_low``: fraction with ``rho < 1 - epsilon_low`` and ``A < 0`` (clipped from below),
    - ``clip_frac_high``: fraction with ``rho > 1 + epsilon_high`` and ``A > 0``,
    - ``clip_frac``: fraction of either,
    - ``ratio``: mean rho,
    - ``kl``: mean k3 KL to ``ref_log_probs``, or to ``old_log_probs`` (how far the update
      moved from the sampling policy) when no reference is given.
    """
    if not isinstance(log_probs, torch.Tensor) or not log_probs.dtype.is_floating_point or log_probs.dim() != 2:
        desc = (f"{log_probs.dtype} tensor of shape {tuple(log_probs.shape)}" if isinstance(log_probs, torch.Tensor)
                else type(log_probs).__name__)
        raise ValueError(f"log_probs must be a floating-point [N, S] tensor, got {desc}")
    shape, device = log_probs.shape, log_probs.device
    if old_log_probs is None:
        old_log_probs = log_probs.detach()
    _check_per_token(old_log_probs, "old_log_probs", shape, device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor [N, S], got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != shape or mask.device != device:
        raise ValueError(f"mask must be [N, S] = {tuple(shape)} on {device}, got {tuple(mask.shape)} on {mask.device}")
    if not isinstance(advantages, torch.Tensor) or not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point tensor [N] or [N, S], got "
                        f"{advantages.dtype if isinstance(advantages, torch.Tensor) else type(advantages).__name__}")
    if advantages.shape not in (shape, shape[:1]) or advantages.device != device:
        raise ValueError(f"advantages must be [N] = ({shape[0]},) or [N, S] = {tuple(shape)} on {device}, got "
                         f"{tuple(advantages.shape)} on {advantages.device}")
    check_choice(loss_type, "loss_type", LOSS_TYPES)
    epsilon_low = check_finite_real(epsilon_low, "epsilon_low")
    epsilon_high = check_finite_real(epsilon_high, "epsilon_high")
    if not 0 <= epsilon_low <= 1:
        raise ValueError(f"epsilon_low must be in [0, 1] (the ratio's lower clip 1 - epsilon_low is >= 0), "
                         f"got {epsilon_low}")
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0 (the ratio's upper clip is 1 + epsilon_high), got {epsilon_high}")
    beta = check_finite_real(beta, "beta")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_log_probs is None:
        raise ValueError(f"beta = {beta} > 0 needs ref_log_probs [N, S], the reference policy's log-probs")
    if ref_log_probs is not None:
        _check_per_token(ref_log_probs, "ref_log_probs", shape, device)

    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    log_probs, old_log_probs = log_probs.to(dtype), old_log_probs.to(dtype)
    if ref_log_probs is not None:
        ref_log_probs = ref_log_probs.to(dtype)
    adv = (advantages if advantages.dim() == 2 else advantages[:, None]).to(dtype)
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl_to = ref_log_probs if ref_log_probs is not None else old_log_probs
    kl = torch.exp(kl_to - log_probs) - (kl_to - log_probs) - 1
    if beta > 0:
        per_token = per_token + beta * kl

    weights = mask.to(dtype)
    active = weights.sum()
    masked_sum = (per_token * weights).sum()
    rows = max(shape[0], 1)  # N = 0: an empty sum over no rows, 0 as documented, not 0/0
    if loss_type == "grpo":
        loss = ((per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)).sum() / rows
    elif LOSS_NORMALIZERS[loss_type] == "tokens":
        loss = masked_sum / active.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max(shape[1], 1) if max_completion_length is None else check_positive_real(
            max_completion_length, "max_completion_length")
        loss = masked_sum / (rows * length)
    elif num_items_in_batch is None:
        loss = masked_sum / active.clamp(min=1.0)
    else:
        items = check_real(num_items_in_batch, "num_items_in_batch", low=0.0)
        if math.isinf(items):
            raise ValueError(f"num_items_in_batch must be a finite count of tokens, got {items}")
        loss = masked_sum / max(items, 1.0)  # TRL clamps it to 1: a batch of no tokens gives 0

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return ((x.to(weights.dtype) * weights).sum() / active.clamp(min=1.0)).detach()

    low = (ratio < 1 - epsilon_low) & (adv < 0)
    high = (ratio > 1 + epsilon_high) & (adv > 0)
    stats = {
        "clip_frac_low": token_mean(low),
        "clip_frac_high": token_mean(high),
        "clip_frac": token_mean(low | high),
        "ratio": token_mean(ratio),
        "kl": token_mean(kl),
    }
    return loss, stats
