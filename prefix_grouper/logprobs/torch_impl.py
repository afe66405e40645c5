"""Torch backend of the per-chunk steps: plain tensor ops, any device.

Each function takes one fresh chunk of logits ``[c, V]`` in the input dtype, upcasts it to
the dtype of the ``[c]`` statistics (float32, or float64 for float64 inputs; a no-op when
it is already that) and works in place on the upcast buffer, so that a chunk holds at most
two chunk-sized buffers (the upcast logits and their ``exp``), three with a softcap (its
``tanh``).
"""
from __future__ import annotations

import torch

__all__ = ["chunk_grad_logits_torch_", "chunk_stats_torch", "scaled_logits"]


def scaled_logits(logits: torch.Tensor, dtype: torch.dtype, inv_temperature: float,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, t)``: ``z = logits * inv_temperature`` in ``dtype``, or with a ``softcap``
    ``z = softcap * t * inv_temperature``, ``t = tanh(logits / softcap)`` (``t`` None without)."""
    if softcap is None:
        return logits.to(dtype).mul_(inv_temperature), None
    capped = logits.to(dtype).div_(softcap).tanh_()
    return capped * (softcap * inv_temperature), capped


def chunk_stats_torch(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, softcap: float | None,
                      log_probs: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor) -> None:
    """Fill ``log_probs``, ``lse`` and ``entropy`` ``[c]`` for ``logits [c, V]`` (may be overwritten).

    ``lse`` is the log-sum-exp of the scaled logits ``z`` (:func:`scaled_logits`: the
    temperature, and the softcap when given); ``targets [c]`` int64.
    """
    # The Triton kernel's formulas, vectorized: one exp pass serves lse and entropy, and
    # H = log s - sum_j e_j (z_j - m) / s has no cancellation (every term <= 0).
    scaled, _ = scaled_logits(logits, lse.dtype, inv_temperature, softcap)
    row_max = scaled.amax(1, keepdim=True)
    shifted = scaled.sub_(row_max)
    exp_shifted = shifted.exp()
    sum_exp = exp_shifted.sum(1)
    log_sum = sum_exp.log()
    torch.add(row_max.squeeze(1), log_sum, out=lse)
    torch.sub(shifted.gather(1, targets[:, None]).squeeze(1), log_sum, out=log_probs)
    # A banned token (-inf logit) has e = 0; clamping its z - m keeps e (z - m) at 0, not NaN.
    shifted.clamp_(min=torch.finfo(shifted.dtype).min)
    torch.sub(log_sum, torch.linalg.vecdot(exp_shifted, shifted) / sum_exp, out=entropy)


def chunk_grad_logits_torch_(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                             entropy: torch.Tensor, grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor | None,
                             inv_temperature: float, softcap: float | None) -> torch.Tensor:
    """The gradient of ``sum(grad_log_probs * log_probs + grad_entropy * entropy)`` with respect
    to ``logits [c, v]``, the columns ``[vocab_start, vocab_start + v)`` of the vocabulary, in the
    statistics' dtype (in the logits' buffer when that is float32/64 and there is no softcap).

    With ``z`` the scaled logits (:func:`scaled_logits`): ``d log p_t / d z = onehot_t - p``
    and ``d H / d z = -p (log p + H)``; the chain to the raw logits multiplies by
    ``inv_temperature``, and with a softcap also by ``1 - t^2``. ``p`` needs only the row's
    ``lse`` over the whole vocabulary, so any block of columns is computed on its own.
    ``targets [c]`` are ids in the whole vocabulary (the one-hot term lands only where a
    target is inside the block); ``lse``, ``entropy``, ``grad_*`` are ``[c]`` in the
    statistics' dtype; ``grad_entropy`` None (the entropy was not used) skips its term.
    """
    log_p, capped = scaled_logits(logits, lse.dtype, inv_temperature, softcap)
    log_p.sub_(lse[:, None])
    p = log_p.exp()
    if grad_entropy is None:
        grad = torch.mul(p, grad_log_probs[:, None], out=log_p).neg_()
    else:
        # A banned token (-inf logit) has p = 0; clamping its log p keeps p (log p + H) at 0, not NaN.
        grad = log_p.clamp_(min=torch.finfo(log_p.dtype).min).add_(entropy[:, None]).mul_(p)
        grad.mul_(-grad_entropy[:, None]).addcmul_(p, grad_log_probs[:, None], value=-1)
    columns = targets - vocab_start
    inside = (columns >= 0) & (columns < grad.shape[1])
    grad.scatter_add_(1, columns.clamp(0, grad.shape[1] - 1)[:, None],
                      torch.where(inside, grad_log_probs, 0.0)[:, None])
    if capped is not None:
        grad.mul_(capped.square_().neg_().add_(1.0))
    return grad.mul_(inv_temperature)
