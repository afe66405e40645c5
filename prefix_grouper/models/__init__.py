"""transformers models on the packed row: the attention implementation (``attention``), the
packed forward and its completion logits / hidden states / log-probs (``packed``), and the
LM head of the fused path (``heads``).

transformers is imported when a function that needs it runs, not with these modules. The
public path for users is :mod:`prefix_grouper.integrations.transformers`, which re-exports
these names; core modules (trainers, the unpacked baseline, the CLI) import them from here.
"""
from __future__ import annotations

from .attention import (ATTENTION_NAME, HARMLESS_KWARGS, install, prefix_grouper_attention, prefix_grouper_mask,
                        register)
from .dropout import disable_dropout
from .heads import fused_head
from .packed import (completion_hidden_states, completion_log_probs, completion_logits, packed_forward, packed_logits,
                     sequence_log_probs)

__all__ = [
    "ATTENTION_NAME",
    "HARMLESS_KWARGS",
    "completion_hidden_states",
    "completion_log_probs",
    "completion_logits",
    "disable_dropout",
    "fused_head",
    "install",
    "packed_forward",
    "packed_logits",
    "prefix_grouper_attention",
    "prefix_grouper_mask",
    "register",
    "sequence_log_probs",
]
