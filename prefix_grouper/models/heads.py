"""The LM head of a transformers causal LM for the fused log-prob path."""
from __future__ import annotations

import torch

from ..checks import check_positive_real

__all__ = ["fused_head"]

# How a causal LM's forward rescales its LM head's logits, by text-config attribute and
# model_type, as read in transformers 5.24's modeling files: "multiply" (Cohere:
# ``logits * logit_scale``; HyperCLOVA X: ``logits * logits_scaling``) or "divide" (Granite:
# ``logits / logits_scaling``). The fused path folds the factor into the temperature; a
# model whose config has one of these attributes but whose type is not listed (MiniCPM3
# divides its hidden states instead, for one) is refused.
_LOGIT_SCALINGS = {
    "logit_scale": {"cohere": "multiply", "cohere2": "multiply", "cohere2_moe": "multiply"},
    "logits_scaling": {"granite": "divide", "granite_swa": "divide", "granitemoe": "divide",
                       "granitemoe_swa": "divide", "granitemoehybrid": "divide", "granitemoeshared": "divide",
                       "hyperclovax": "multiply"},
}


def fused_head(model, temperature: float) -> tuple[torch.nn.Linear, float, float | None]:
    """``(lm_head, temperature, softcap)`` for :func:`fused_linear_log_probs`: the model's
    output embedding, the temperature with the logit scaling of its forward folded in, and
    its final-logit softcapping (Gemma 2's ``config.final_logit_softcapping``) or None.

    Refuses heads that are not a linear map of the last hidden state, capped at most (an
    output embedding that is no ``nn.Linear``, a scaling of unknown direction, a scaling
    beside a softcap, whose order the fused kernels would have to guess).
    """
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = check_positive_real(softcap, "config.final_logit_softcapping")
    for attribute, directions in _LOGIT_SCALINGS.items():
        if not hasattr(config, attribute):
            continue
        if softcap is not None:
            raise ValueError(f"fused=True does not know in which order {model_type!r} applies config.{attribute} "
                             f"and config.final_logit_softcapping; use fused=False")
        if model_type not in directions:
            raise ValueError(f"fused=True does not know whether model_type {model_type!r} multiplies or divides "
                             f"its logits by config.{attribute}; use fused=False")
        scale = check_positive_real(getattr(config, attribute), f"config.{attribute}")
        temperature = temperature / scale if directions[model_type] == "multiply" else temperature * scale
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"fused=True needs the model's output embedding to be a torch.nn.Linear [vocab, hidden] "
                        f"(tied or not), got {type(head).__name__}")
    return head, temperature, softcap
