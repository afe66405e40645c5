"""``AttentionForward``: the attention call of the paper package's ``PrefixGrouper.forward``.

The paper's protocol is ``AttentionForward(attn_func)(prefix_grouper, q, k, v, *args,
**kwargs)`` with q/k/v ``[groups, heads, L, head_dim]`` in the grouper's rows and a result
``[groups, L, heads, head_dim]``; ``attn_func(q, k, v, attn_mask, *args, **kwargs)`` is a
plain softmax attention. This one never calls ``attn_func``: it runs
:func:`prefix_grouper.prefix_attention` once on the valid tokens, through the one transformers
adapter (:mod:`prefix_grouper.models.attention`, which reads the keywords and documents
the policy for dropout and masks), so the result cannot depend on how ``attn_func`` treats a
mask (transformers' sdpa refuses a 2-D one, flex attention indexes it out of range, eager
ignores the grouping).
"""
from __future__ import annotations

from typing import Callable

import torch

from .models.attention import GroupedRows, call_settings, run_on_rows

__all__ = ["AttentionForward", "AttnFuncType", "GroupedRows"]

# attn_func(q, k, v, attn_mask, *args, **kwargs) -> [b, seq, heads, head_dim]
AttnFuncType = Callable[..., torch.Tensor]


class AttentionForward:
    """Callable running a :class:`~prefix_grouper.PrefixGrouper`'s shared-prefix attention.

    ``attn_func`` is kept for the paper's signature only; see the module docstring.
    """

    def __init__(self, attn_func: AttnFuncType | None = None) -> None:
        self.attn_func = attn_func

    def __call__(self, prefix_grouper: GroupedRows, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 *args, **kwargs) -> torch.Tensor:
        for i, arg in enumerate(args):
            # The paper's transformers adapter passes the attention layer positionally.
            if not isinstance(arg, torch.nn.Module):
                raise TypeError(f"PrefixGrouper.forward: positional argument {i} after q, k, v is a "
                                f"{type(arg).__name__}; pass attention options as keywords (scaling=, "
                                f"sliding_window=, softcap=, s_aux=)")
        settings = call_settings(args[0] if args else None, kwargs, grouped=True)
        groups, length = prefix_grouper.x_shape
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != groups or x.shape[2] != length:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape [{groups}, heads, {length}, head_dim] (the grouper's rows, "
                                 f"head-first), got {got}")
        layout, index = prefix_grouper.layout_and_index(q.device)
        out = run_on_rows(q, k, v, layout, settings, prefix_grouper.backend, index)
        prefix_grouper.record_attention_call()
        return out
