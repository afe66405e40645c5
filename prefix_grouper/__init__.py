"""prefix_grouper: encode a GRPO group's shared prompt once.

Packs a group as ``prefix, suffix_1..suffix_G`` and provides shared-prefix attention
(:func:`prefix_attention`) whose outputs and gradients equal those of the naive
``[prefix; suffix_i]`` layout, plus grouped advantage kernels
(:mod:`prefix_grouper.advantages`).
"""
from .attention import available_backends, prefix_attention
from .layout import GroupLayout

__all__ = ["GroupLayout", "available_backends", "prefix_attention"]
__version__ = "0.1.0"
