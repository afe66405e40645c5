"""Torch backend of the per-chunk steps: plain tensor ops, any device.

Each function takes one fresh chunk of logits ``[c, V]`` in the input dtype, upcasts it to
the dtype of the ``[c]`` statistics (float32, or float64 for float64 inputs; a no-op when
it is already that) and works in place on the upcast buffer, so that a chunk holds at most
a few chunk-sized temporaries (``logsumexp``'s and ``exp``'s).
"""
from __future__ import annotations

import torch

__all__ = ["chunk_grad_logits_torch_", "chunk_stats_torch"]


def chunk_stats_torch(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float,
                      log_probs: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor) -> None:
    """Fill ``log_probs``, ``lse`` and ``entropy`` ``[c]`` for ``logits [c, V]`` (may be overwritten).

    ``lse`` is the log-sum-exp of ``logits * inv_temperature``; ``targets [c]`` int64.
    """
    scaled = logits.to(lse.dtype).mul_(inv_temperature)
    torch.logsumexp(scaled, dim=1, out=lse)
    log_p = scaled.sub_(lse[:, None])
    log_probs.copy_(log_p.gather(1, targets[:, None]).squeeze(1))
    # A banned token (-inf logit) has p = 0; clamping its log p keeps p * log p at 0, not NaN.
    log_p.clamp_(min=torch.finfo(log_p.dtype).min)
    torch.neg(torch.linalg.vecdot(log_p.exp(), log_p), out=entropy)


def chunk_grad_logits_torch_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                             entropy: torch.Tensor, grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor,
                             inv_temperature: float) -> torch.Tensor:
    """The gradient of ``sum(grad_log_probs * log_probs + grad_entropy * entropy)`` with respect
    to ``logits [c, V]``, in the statistics' dtype (in the logits' buffer when that is float32/64).

    With ``z = logits * inv_temperature``: ``d log p_t / d z = onehot_t - p`` and
    ``d H / d z = -p (log p + H)``; both are scaled by ``inv_temperature`` for the chain to
    the raw logits. ``lse``, ``entropy``, ``grad_*`` are ``[c]`` in the logits' dtype.
    """
    log_p = logits.to(lse.dtype).mul_(inv_temperature).sub_(lse[:, None])
    p = log_p.exp()
    grad = log_p.clamp_(min=torch.finfo(log_p.dtype).min).add_(entropy[:, None]).mul_(p)
    grad.mul_(-grad_entropy[:, None]).addcmul_(p, grad_log_probs[:, None], value=-1)
    grad.scatter_add_(1, targets[:, None], grad_log_probs[:, None])
    return grad.mul_(inv_temperature)
