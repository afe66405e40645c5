"""The paper package's transformers attention ``"prefix_grouper_attention"``.

``register_attention()`` then ``model.set_attn_implementation("prefix_grouper_attention")``
(or ``attn_implementation=`` at load); every model call passes ``prefix_grouper=`` (a
:class:`~prefix_grouper.PrefixGrouper`). ``prefix_grouper_attn_func=`` names the
attention the paper's package calls twice per layer (default ``"flash_attention_2"``); it
is accepted and unused here: the call runs :func:`prefix_grouper.prefix_attention` once.
transformers is imported when :func:`register_attention` runs, not with this module.

:func:`route_eager_attention` makes transformers' ``"eager"`` attention honor
``prefix_grouper=`` too (models resolve eager to their module's own function, which
silently ignores unknown keywords): :class:`~prefix_grouper.PrefixGrouper` calls it when
built with transformers loaded, so code that patches only ``ALL_ATTENTION_FUNCTIONS``
(verl's ``apply_prefix_grouper_patch``) is right under eager as well.
"""
from __future__ import annotations

import sys

import torch

from ..forward import AttentionForward, GroupedRows

__all__ = ["ATTENTION_NAME", "eager_attention_dispatch", "prefix_grouper_attention_forward", "register_attention",
           "route_eager_attention"]

ATTENTION_NAME = "prefix_grouper_attention"


def prefix_grouper_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                     value: torch.Tensor, attention_mask, *args, prefix_grouper=None,
                                     prefix_grouper_attn_func: str = "flash_attention_2", **kwargs):
    """transformers attention function: ``(output [b, seq, heads, head_dim], None)``.

    The grouper's rows are the mask: transformers builds none for this implementation, and
    a call without ``prefix_grouper=`` (``generate()``, evaluation) is refused, as in the
    paper's package; switch the model's attention implementation for those.
    """
    if prefix_grouper is None:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} needs prefix_grouper= in every model call; for "
                         f"calls without one (generate, evaluation) set the model's attention implementation to "
                         f"{prefix_grouper_attn_func!r} (model.set_attn_implementation)")
    if not isinstance(prefix_grouper, GroupedRows):
        raise TypeError(f"prefix_grouper must be a prefix_grouper.PrefixGrouper, got {type(prefix_grouper).__name__}")
    return AttentionForward()(prefix_grouper, query, key, value, module, *args, **kwargs), None


def register_attention() -> None:
    """Register ``"prefix_grouper_attention"`` with transformers' ``AttentionInterface`` (idempotent)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_grouper_attention_forward)


def _own_eager_attention(module: torch.nn.Module):
    """The ``eager_attention_forward`` that ``module``'s forward would call: a global of the
    module defining that forward (every modeling file has its own: softcapping, sinks...)."""
    forward = getattr(type(module), "forward", None)
    for name in (getattr(forward, "__module__", None), type(module).__module__):
        eager = getattr(sys.modules.get(name), "eager_attention_forward", None)
        if eager is not None and eager is not eager_attention_dispatch:
            return eager
    raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in the module of its forward "
                       f"({getattr(forward, '__module__', None)}) to run eager attention with")


def eager_attention_dispatch(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, *args, prefix_grouper=None, **kwargs):
    """transformers' ``"eager"``: grouped attention for calls with ``prefix_grouper=``, the
    model's own eager attention, unchanged, for all others."""
    if prefix_grouper is None:
        return _own_eager_attention(module)(module, query, key, value, attention_mask, *args, **kwargs)
    return prefix_grouper_attention_forward(module, query, key, value, attention_mask, *args,
                                            prefix_grouper=prefix_grouper, **kwargs)


def route_eager_attention() -> None:
    """Register :func:`eager_attention_dispatch` as transformers' ``"eager"`` unless an
    ``"eager"`` is registered already (idempotent; a wrapper of it is kept as it is)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if "eager" not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register("eager", eager_attention_dispatch)
