"""prefix_grouper: encode a GRPO group's shared prompt once.

Packs a group as ``prefix, suffix_1..suffix_G`` and provides shared-prefix attention
(:func:`prefix_attention`) whose outputs and gradients equal those of the unpacked
``[prefix; suffix_i]`` rows (:mod:`prefix_grouper.unpacked`), plus grouped advantage
kernels (:mod:`prefix_grouper.advantages`) and their broadcast onto tokens.
"""
from .attention import available_backends, prefix_attention
from .layout import GroupLayout, broadcast_to_padded, broadcast_to_tokens
from .logprobs import fused_linear_log_probs

__all__ = ["GroupLayout", "available_backends", "broadcast_to_padded", "broadcast_to_tokens", "fused_linear_log_probs",
           "prefix_attention"]
__version__ = "0.1.0"
