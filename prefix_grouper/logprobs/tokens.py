"""Log-probs (and entropies) of target tokens from a ``[M, vocab]`` logits matrix."""
from __future__ import annotations

from typing import Any

import torch

from ..checks import check_bool, check_int, check_positive_real

__all__ = ["check_completion_lens", "token_log_probs"]


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


def check_completion_lens(completion_lens: Any, num_sequences: int) -> list[int]:
    """``completion_lens`` as ``num_sequences`` ints >= 0 (the scored tokens at the end of each
    sequence): a list or tuple of ints, or a 1-D integer tensor. Floats, bools and strings are
    refused, not truncated (``int(2.9)`` would score 2 tokens where 3 were meant)."""
    if isinstance(completion_lens, torch.Tensor):
        dtype = completion_lens.dtype
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"completion_lens must hold integer token counts, got a {completion_lens.dtype} tensor")
        if completion_lens.dim() != 1:
            raise ValueError(f"completion_lens must be 1-D, one count per sequence, got shape "
                             f"{tuple(completion_lens.shape)}")
        values = [int(c) for c in completion_lens.tolist()]
    elif isinstance(completion_lens, (list, tuple)):
        values = [check_int(c, f"completion_lens[{i}]", 0) for i, c in enumerate(completion_lens)]
    else:
        raise TypeError(f"completion_lens must be a list of ints or a 1-D integer tensor, one count per sequence; "
                        f"got {type(completion_lens).__name__} {completion_lens!r}")
    if len(values) != num_sequences:
        raise ValueError(f"completion_lens has {len(values)} entries, the layout packs {num_sequences} sequences")
    negative = [i for i, c in enumerate(values) if c < 0]
    if negative:
        raise ValueError(f"completion_lens[{negative[0]}] = {values[negative[0]]}: counts must be >= 0")
    return values
