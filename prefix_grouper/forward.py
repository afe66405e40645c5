"""``AttentionForward``: the attention call of the paper package's ``PrefixGrouper.forward``.

The paper's protocol is ``AttentionForward(attn_func)(prefix_grouper, q, k, v, *args,
**kwargs)`` with q/k/v ``[groups, heads, L, head_dim]`` in the grouper's rows and a result
``[groups, L, heads, head_dim]``; ``attn_func(q, k, v, attn_mask, *args, **kwargs)`` is a
plain softmax attention. This one never calls ``attn_func``: it gathers the valid tokens
into one packed row and runs :func:`prefix_grouper.prefix_attention` on it once, so the
result cannot depend on how ``attn_func`` treats a mask (transformers' sdpa refuses a 2-D
one, flex attention indexes it out of range, eager ignores the grouping). The keywords
transformers passes to an attention function are honored or refused, never dropped.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from .attention import prefix_attention
from .layout import GroupLayout

__all__ = ["AttentionForward", "AttnFuncType", "GroupedRows", "attention_options"]


@runtime_checkable
class GroupedRows(Protocol):
    """What :class:`AttentionForward` needs of a :class:`~prefix_grouper.PrefixGrouper`: the
    rows' shape, the backend, and the packed layout of the valid tokens. A protocol rather
    than an import, so that this module sits below the grouper that calls it."""

    x_shape: tuple[int, int]
    backend: str

    def layout_and_index(self, device: torch.device) -> tuple[GroupLayout, torch.Tensor]:
        """``(layout, index)``: the packed layout and the row positions of its tokens."""

    def record_attention_call(self) -> None:
        """Note that an attention layer ran on the grouper's rows."""

# attn_func(q, k, v, attn_mask, *args, **kwargs) -> [b, seq, heads, head_dim]
AttnFuncType = Callable[..., torch.Tensor]

# Keyword spellings of what prefix_attention can do, as attention functions receive them:
# transformers (scaling, sliding_window, softcap, s_aux), flash-attn (softmax_scale,
# softcap), torch SDPA (scale).
_SCALE = ("scaling", "softmax_scale", "scale")
_WINDOW = ("sliding_window", "window")
_SOFTCAP = ("softcap",)
_SINKS = ("s_aux", "sinks")
_DROPOUT = ("dropout", "dropout_p")
# Keywords whose information the grouper's layout already holds (the mask, the positions
# of the rows) or that do not change the attention output.
_SUPERSEDED = frozenset({
    "attention_mask", "attn_mask", "position_ids", "cache_position", "use_cache", "layer_idx",
    "prefix_grouper_attn_func", "query_length", "target_dtype", "implementation", "use_top_left_mask",
    "deterministic", "return_dict", "output_hidden_states",
})
# Keywords that must hold one of these values (anything else asks for what is not done here).
_REQUIRED_VALUES = {"is_causal": (None, True), "output_attentions": (None, False)}


def _first(kwargs: dict, names: tuple[str, ...]) -> Any:
    given = [(n, kwargs[n]) for n in names if kwargs.get(n) is not None]
    if len(given) > 1:
        raise TypeError(f"attention keywords {', '.join(n for n, _ in given)} say the same thing; pass one")
    return given[0][1] if given else None


def attention_options(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``prefix_attention`` keywords (softmax_scale, window, softcap, sinks) from an attention
    call's extra ``args`` and ``kwargs``; raises on anything it cannot honor."""
    for i, arg in enumerate(args):
        # The paper's transformers adapter passes the attention layer positionally.
        if not isinstance(arg, torch.nn.Module):
            raise TypeError(f"PrefixGrouper.forward: positional argument {i} after q, k, v is a "
                            f"{type(arg).__name__}; pass attention options as keywords (scaling=, "
                            f"sliding_window=, softcap=, s_aux=)")
    known = set(_SCALE + _WINDOW + _SOFTCAP + _SINKS + _DROPOUT) | _SUPERSEDED | set(_REQUIRED_VALUES)
    unknown = sorted(n for n, value in kwargs.items() if n not in known and value is not None)
    if unknown:
        raise TypeError(f"PrefixGrouper.forward cannot honor the attention keyword(s) {unknown}: its attention is "
                        f"causal softmax attention over the grouped rows with scaling, sliding_window, softcap "
                        f"and s_aux (sinks) only")
    for name, allowed in _REQUIRED_VALUES.items():
        if name in kwargs and kwargs[name] not in allowed:
            raise ValueError(f"PrefixGrouper.forward: {name}={kwargs[name]!r} is not supported (it computes causal "
                             f"attention and returns no attention weights)")
    dropout = _first(kwargs, _DROPOUT)
    if dropout:
        raise ValueError(f"PrefixGrouper.forward does not implement attention dropout (got {dropout}); set the "
                         f"model's attention_dropout to 0")
    softcap = _first(kwargs, _SOFTCAP)
    return {
        "softmax_scale": _first(kwargs, _SCALE),
        "window": _first(kwargs, _WINDOW),
        # flash-attn's softcap=0.0 means no softcapping.
        "softcap": softcap if softcap else None,
        "sinks": _first(kwargs, _SINKS),
    }


class AttentionForward:
    """Callable running a :class:`~prefix_grouper.PrefixGrouper`'s shared-prefix attention.

    ``attn_func`` is kept for the paper's signature only; see the module docstring.
    """

    def __init__(self, attn_func: AttnFuncType | None = None) -> None:
        self.attn_func = attn_func

    def __call__(self, prefix_grouper: GroupedRows, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 *args, **kwargs) -> torch.Tensor:
        options = attention_options(args, kwargs)
        groups, length = prefix_grouper.x_shape
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != groups or x.shape[2] != length:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape [{groups}, heads, {length}, head_dim] (the grouper's rows, "
                                 f"head-first), got {got}")
        layout, index = prefix_grouper.layout_and_index(q.device)
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            # Under autocast, rotary embeddings leave q and k in float32 while v is in the
            # autocast dtype; an autocast attention (sdpa) runs in the autocast dtype, so does this.
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        flat = [x.transpose(1, 2).reshape(groups * length, *x.shape[1::2]).index_select(0, index)
                for x in (q, k, v)]
        out = prefix_attention(*flat, layout, backend=prefix_grouper.backend,
                               **{key: value for key, value in options.items() if value is not None})
        prefix_grouper.record_attention_call()
        rows = out.new_zeros((groups * length, *out.shape[1:]))
        return rows.index_copy(0, index, out).view(groups, length, *out.shape[1:])
