"""Log-probs (and entropies) of target tokens from a ``[M, vocab]`` logits matrix."""
from __future__ import annotations

import torch

from ..checks import check_bool, check_positive_real

__all__ = ["token_log_probs"]


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                    return_entropy: bool = False):
    """``log_softmax(logits / temperature)`` at ``targets``: logits ``[M, V]``, targets ``[M]`` -> ``[M]``.

    Computed in float32 (float64 for float64 logits) without a float32 copy of the logits;
    the division, skipped at temperature 1, stays in the logits' dtype as in TRL. With
    ``return_entropy=True`` returns ``(log_probs [M], entropy [M])``, the entropy
    ``-(p * log p).sum(-1)`` of the same distribution in the same precision (TRL's
    ``entropy_from_logits``).
    """
    temperature = check_positive_real(temperature, "temperature")
    check_bool(return_entropy, "return_entropy")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating-point [M, vocab] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be a [M={logits.shape[0]}] tensor of token ids, got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    target_log_probs = log_probs.gather(-1, targets[:, None])[:, 0]
    if not return_entropy:
        return target_log_probs
    # A -inf logit (a banned token) has p = 0: clamping its log p keeps 0 * log 0 at 0 and
    # its gradient at 0, not NaN, as fused_linear_log_probs does.
    entropy = -(log_probs.exp() * log_probs.clamp_min(torch.finfo(log_probs.dtype).min)).sum(-1)
    return target_log_probs, entropy
