"""Float64 oracle: full logits, no chunking, autograd through plain torch ops."""
from __future__ import annotations

import torch

__all__ = ["reference_log_probs"]


def reference_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs [C], entropy [C])`` of ``softmax(logits / temperature)``, ``logits =
    hidden [C, H] @ weight [V, H].T + bias [V]``, capped to ``softcap * tanh(logits / softcap)``
    first when ``softcap`` is given (Gemma 2's final-logit softcapping).

    Everything is cast to float64 and the full ``[C, V]`` logits are materialized: meant for
    tests and small shapes only. Differentiable with respect to every float input.
    """
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    # entr(p) = -p log p with entr(0) = 0: a banned token (-inf logit) adds nothing.
    entropy = torch.special.entr(log_p.exp()).sum(-1)
    return log_p.gather(1, targets.long()[:, None]).squeeze(1), entropy
