"""LM heads: log-probs from logits, and the model's head for the fused path."""
from __future__ import annotations

import torch

from ...checks import check_bool, check_positive_real

__all__ = ["fused_head", "token_log_probs"]

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


def fused_head(model, temperature: float) -> tuple[torch.nn.Linear, float]:
    """``(lm_head, temperature)`` for :func:`fused_linear_log_probs`: the model's output
    embedding and the temperature with the logit scaling of its forward folded in.

    Refuses heads that are not a plain linear map of the last hidden state (final-logit
    softcapping, an output embedding that is no ``nn.Linear``, a scaling of unknown direction).
    """
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"fused=True cannot apply {model_type}'s final-logit softcapping (config."
                         f"final_logit_softcapping={config.final_logit_softcapping}): tanh is not a "
                         f"linear head; use fused=False")
    for attribute, directions in _LOGIT_SCALINGS.items():
        if not hasattr(config, attribute):
            continue
        if model_type not in directions:
            raise ValueError(f"fused=True does not know whether model_type {model_type!r} multiplies or divides "
                             f"its logits by config.{attribute}; use fused=False")
        scale = check_positive_real(getattr(config, attribute), f"config.{attribute}")
        temperature = temperature / scale if directions[model_type] == "multiply" else temperature * scale
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"fused=True needs the model's output embedding to be a torch.nn.Linear [vocab, hidden] "
                        f"(tied or not), got {type(head).__name__}")
    return head, temperature


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
