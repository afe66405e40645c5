"""The one transformers adapter: every attention function prefix_grouper registers with
transformers is registered here, reads a layer's settings from its call here
(:func:`call_settings`) and runs :func:`prefix_grouper.prefix_attention` here (:func:`run_on_rows`).

Two call structures reach it. A **packed call** carries ``prefix_layout=`` (a
:class:`GroupLayout`; :func:`prefix_grouper_attention`, registered as ``"prefix_grouper"`` and
``"prefix_grouper+<previous>"`` by :func:`register` / :func:`install`): query
``[1, Hq, T, D]`` on one packed row. A **grouped call** carries ``prefix_grouper=`` (the paper
package's :class:`~prefix_grouper.PrefixGrouper`; ``"prefix_grouper_attention"`` by
:func:`register_paper_attention`, ``"eager"`` by :func:`route_eager_attention`, and
``PrefixGrouper.forward`` itself): query ``[groups, Hq, L, D]`` in the grouper's padded rows.

One reading of a call (:func:`call_settings`), for both: the layer's ``scaling``,
``sliding_window`` (Mistral, Qwen2 with ``use_sliding_window``, Gemma 2/3, gpt-oss),
``softcap`` (Gemma 2; 0 means none, as in flash-attn) and ``s_aux`` (gpt-oss's sinks), also
under flash-attn's and SDPA's spellings; read per call, never per model (Gemma 2/3 and
gpt-oss alternate sliding and full layers). A keyword the attention does not implement
raises an error that names it, so that a model feature added later cannot be dropped.

One policy:

- **Dropout**: attention dropout is refused wherever it would apply (``dropout > 0`` from a
  layer in training mode, or from a caller that names no layer); a layer in eval mode
  applies none, so none is applied here either. RL policy updates run without dropout
  (:func:`prefix_grouper.models.disable_dropout`).
- **Masks**: the call's structure is the mask. A grouped call's mask describes the grouper's
  padded rows, which the grouper already holds: superseded. A packed call gets no mask from
  transformers (:func:`prefix_grouper_mask` returns none for it): a dense mask there means the
  model was called outside :func:`~prefix_grouper.models.packed.packed_forward`, and is
  refused; a sliding-window mask arrives as a :class:`LocalMask` whose size the layer's own
  ``sliding_window`` must equal.
- **Causality**: ``is_causal`` must be True (or unset on a causal layer);
  ``output_attentions`` must be off.
"""
from __future__ import annotations

import sys
from typing import Any, Protocol, runtime_checkable

import torch

from ..attention import prefix_attention
from ..layout import GroupLayout
from .dropout import attention_dropout_error
from .packed_call import (ATTENTION_NAME, FALLBACK_SEPARATOR, PACKED_CALL, LocalMask, PackedCall, fallback_of,
                          prefix_grouper_mask)

__all__ = ["ATTENTION_NAME", "BACKEND_KWARG", "HARMLESS_KWARGS", "LAYOUT_KWARG", "PACKED_CALL", "PAPER_ATTENTION_NAME",
           "WRAPPER_KWARG",
           "GroupedRows", "PackedCall", "call_settings", "eager_attention_dispatch", "install",
           "paper_attention_forward", "prefix_grouper_attention", "prefix_grouper_mask", "register",
           "register_paper_attention", "route_eager_attention", "run_on_rows"]

PAPER_ATTENTION_NAME = "prefix_grouper_attention"
LAYOUT_KWARG = "prefix_layout"
BACKEND_KWARG = "prefix_backend"
# A model-call keyword holding ``wrapper(attention, module, query, key, value, attention_mask,
# dropout=, scaling=, **kwargs)``, run in place of a packed call's attention with
# prefix_grouper_attention as ``attention`` (e.g. Ulysses sequence parallelism exchanging
# sequence and heads around it). A keyword, not a registration: registering attention
# functions stays in this module, and gradient checkpointing's recomputation sees it too.
WRAPPER_KWARG = "prefix_attention_wrapper"
# Keywords that reach the attention function (a model call's keywords travel down to every
# attention layer) and change nothing prefix_attention computes, as checked in the modeling
# files of transformers 5.10.4 and 5.24 for Llama, Qwen2/3, Mistral, Gemma 2/3, gpt-oss, GPT-2:
# position ids (the rotary embeddings already used them; the layout carries the packed
# row's own), the cache switch (a packed call runs without a cache), and the MoE router's
# output switch. Keywords that describe another packing (cu_seq_lens_*, max_length_*) are
# deliberately absent: the layout is the packing, and a second one cannot be honored.
HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "output_router_logits", LAYOUT_KWARG, BACKEND_KWARG})
# What a grouped call's keywords may also hold: what the grouper's rows already hold (their
# mask and positions), and what does not change the output, as attention functions of
# transformers, flash-attn and the paper's package receive it.
_GROUPED_SUPERSEDED = frozenset({
    "attention_mask", "attn_mask", "cache_position", "layer_idx", "prefix_grouper_attn_func", "query_length",
    "target_dtype", "implementation", "use_top_left_mask", "deterministic", "return_dict", "output_hidden_states",
})
# Each setting under the spellings attention functions receive it: transformers first, then
# flash-attn's and SDPA's (grouped calls only: the paper's protocol passes them through).
_SPELLINGS = {
    "softmax_scale": ("scaling", "softmax_scale", "scale"),
    "window": ("sliding_window", "window"),
    "softcap": ("softcap",),
    "sinks": ("s_aux", "sinks"),
    "dropout": ("dropout", "dropout_p"),
}
_TRANSFORMERS_SPELLINGS = frozenset(names[0] for names in _SPELLINGS.values())
# Keywords that must hold one of these values (anything else asks for what is not done here).
_REQUIRED_VALUES = {"is_causal": (None, True), "output_attentions": (None, False)}


@runtime_checkable
class GroupedRows(Protocol):
    """What a grouped call needs of a :class:`~prefix_grouper.PrefixGrouper`: the rows' shape,
    the backend, the packed layout of the valid tokens, and a note per attention layer run. A
    protocol rather than an import, so that this module sits below the grouper."""

    x_shape: tuple[int, int]
    backend: str

    def layout_and_index(self, device: torch.device) -> tuple[GroupLayout, torch.Tensor]:
        """``(layout, index)``: the packed layout and the row positions of its tokens."""

    def record_attention_call(self) -> None:
        """Note that an attention layer ran on the grouper's rows."""


# ---------------------------------------------------------------------------- reading a call


def _caller(module) -> str:
    return type(module).__name__ if module is not None else "PrefixGrouper.forward's caller"


def _window(module, sliding_window) -> int | None:
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"{_caller(module)} passed sliding_window={sliding_window!r}; prefix_grouper's "
                         f"attention takes an int >= 1 (a key is visible when q_pos - sliding_window < k_pos) "
                         f"or None")
    return sliding_window


def _setting(kwargs: dict, names: tuple[str, ...]) -> Any:
    given = [(name, kwargs[name]) for name in names if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError(f"attention keywords {', '.join(name for name, _ in given)} say the same thing; pass one")
    return given[0][1] if given else None


def call_settings(module, kwargs: dict, *, grouped: bool) -> dict:
    """prefix_attention's ``softmax_scale``, ``window``, ``softcap`` and ``sinks`` from one
    attention call's keywords (``module``: the calling layer, or None), under the module
    docstring's policy; ``grouped``: a grouped call (more spellings, its rows' keywords)."""
    accepted = HARMLESS_KWARGS | set(_REQUIRED_VALUES) | (
        {name for names in _SPELLINGS.values() for name in names} | _GROUPED_SUPERSEDED if grouped
        else _TRANSFORMERS_SPELLINGS)
    unknown = sorted(name for name, value in kwargs.items()
                     if name not in accepted and (value is not None or not grouped))
    if unknown:
        raise TypeError(f"{_caller(module)} passed the attention keyword(s) {', '.join(unknown)}, which "
                        f"prefix_grouper's attention does not implement (it implements scaling, sliding_window, "
                        f"softcap and s_aux and ignores only {', '.join(sorted(HARMLESS_KWARGS))}"
                        f"{' and the grouper rows keywords' if grouped else ''}); its result would differ from "
                        f"the model's own attention")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if is_causal is not True:
        raise ValueError(f"{_caller(module)} runs non-causal attention (is_causal={is_causal!r}, e.g. "
                         f"use_bidirectional_attention); prefix_grouper's attention is causal")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{_caller(module)} asked for output_attentions=True; prefix_grouper's attention returns "
                         f"no attention weights")
    values = {name: _setting(kwargs, spellings) for name, spellings in _SPELLINGS.items()}
    dropout = values.pop("dropout")
    if dropout and (module is None or module.training):
        raise attention_dropout_error(module, dropout, ATTENTION_NAME)
    values["window"] = _window(module, values["window"])
    values["softcap"] = values["softcap"] or None  # flash-attn's softcap=0.0 means none
    return values


def run_on_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: GroupLayout, settings: dict,
                backend: str, index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`prefix_attention` on head-first rows: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, L, D]``.

    ``index`` None: one packed row (``B = 1``, ``L = layout.total_tokens``); else the flat
    positions (``b * L + l``) of the layout's tokens in the rows. Returns ``[B, L, Hq, D]``,
    zeros where no token sits.
    """
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast, rotary embeddings leave q and k in float32 while v is in the autocast
        # dtype; sdpa, an autocast op, runs in the autocast dtype, and so does this.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rows, length = query.shape[0], query.shape[2]
    flat = [x.transpose(1, 2).reshape(rows * length, *x.shape[1::2]) for x in (query, key, value)]
    if index is not None:
        flat = [x.index_select(0, index) for x in flat]
    out = prefix_attention(*flat, layout, backend=backend, **settings)
    if index is not None:
        out = out.new_zeros((rows * length, *out.shape[1:])).index_copy(0, index, out)
    return out.view(rows, length, *out.shape[1:])


# ---------------------------------------------------------------------------- packed calls


def _fallback_attention(fallback: str, module):
    from transformers import AttentionInterface

    if fallback == "eager":
        # Every modeling file defines its own eager attention (softcapping, sinks...).
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}'s module defines no eager_attention_forward to fall back to")
        return eager
    return AttentionInterface()[fallback]


def _check_head_first(query, key, value, total_tokens: int) -> None:
    """query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]``: transformers' head-first layout."""
    tensors = (("query", query), ("key", key), ("value", value))
    shapes = {name: tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for name, x in tensors}
    for name, x in tensors:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == 1 and x.shape[2] == total_tokens:
            continue
        token_first = isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == total_tokens
        hint = ("it looks token-first [1, T, heads, head_dim] (prefix_attention's own layout); "
                if token_first else "")
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' expects transformers' head-first layout on one packed "
            f"row: query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] with T = "
            f"layout.total_tokens = {total_tokens}; got {name} {shapes[name]}: {hint}(query {shapes['query']}, "
            f"key {shapes['key']}, value {shapes['value']}); call the model on input_ids=layout.pack(...)[None]")


def prefix_grouper_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function of packed calls: query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]``.

    A call with the model-call keyword ``prefix_layout=layout`` (the batch's
    :class:`GroupLayout`) runs :func:`prefix_attention` on the packed row with this layer's
    settings (:func:`call_settings`); the optional ``prefix_backend`` picks its backend.
    Returns ``([1, T, Hq, D], None)`` as transformers expects. A call without it runs the
    implementation :func:`install` recorded, or raises under the strict ``"prefix_grouper"``.
    A call carrying :data:`WRAPPER_KWARG` runs that wrapper around this function instead.
    """
    wrapper = kwargs.pop(WRAPPER_KWARG, None)
    if wrapper is not None:
        return wrapper(prefix_grouper_attention, module, query, key, value, attention_mask, dropout=dropout,
                       scaling=scaling, **kwargs)
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        fallback = fallback_of(getattr(getattr(module, "config", None), "_attn_implementation", None))
        if fallback is None:
            raise ValueError(
                f"attn_implementation='{ATTENTION_NAME}' needs the batch's GroupLayout: call the model with "
                f"{LAYOUT_KWARG}=layout, or use completion_log_probs(), which also keeps the model's own "
                f"attention for every other call"
            )
        return _fallback_attention(fallback, module)(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"{LAYOUT_KWARG} must be a GroupLayout, got {type(layout).__name__}")
    _check_head_first(query, key, value, layout.total_tokens)
    settings = call_settings(module, {"dropout": dropout, "scaling": scaling, **kwargs}, grouped=False)
    if isinstance(attention_mask, LocalMask):
        if settings["window"] != attention_mask.size:
            raise ValueError(
                f"{type(module).__name__} was given a local attention mask of size {attention_mask.size} (a sliding "
                f"window or chunked attention) but passed sliding_window={settings['window']}: prefix_grouper "
                f"honors a layer's sliding_window only, and would not compute what the mask says")
    elif attention_mask is not None:
        raise ValueError(
            f"a {LAYOUT_KWARG}= call takes its mask from the layout, but the attention got a "
            f"{type(attention_mask).__name__} mask: do not pass attention_mask, and call the model through "
            f"completion_logits() / completion_log_probs(), which build no dense mask"
        )
    packed_call = PACKED_CALL.get()
    if packed_call is not None:
        packed_call.attention_calls += 1
    return run_on_rows(query, key, value, layout, settings, kwargs.get(BACKEND_KWARG, "auto")), None


def register() -> None:
    """Register the strict ``attn_implementation="prefix_grouper"`` with transformers (idempotent).

    Models set to it get no attention mask from transformers (the layout is the mask) and
    must be called with ``prefix_layout=...``. :func:`install` is usually what you want.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_grouper_attention)


def install(model) -> str:
    """Give ``model`` the dispatching attention ``"prefix_grouper+<previous>"`` (idempotent).

    Calls with ``prefix_layout=`` run :func:`prefix_attention`; all others run the previous
    implementation (sdpa, eager, flash...) with its own masks, so ``generate()`` and every
    other use of the model behave as before. The change is permanent, which keeps it right
    under gradient checkpointing, whose recomputation runs after the forward call returned.
    A model already on ``"prefix_grouper"`` (strict) is left as it is.

    Returns the model's attention implementation name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    register()
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME or fallback_of(current) is not None:
        return current
    if not isinstance(current, str):
        raise TypeError(f"model must be a transformers model with config._attn_implementation set, got "
                        f"{type(model).__name__} with {current!r}")
    submodel_implementations = {getattr(getattr(m, "config", None), "_attn_implementation", current)
                                for m in model.modules() if hasattr(m, "set_attn_implementation")}
    if submodel_implementations != {current}:
        raise ValueError(f"model's submodels use several attention implementations "
                         f"({sorted(map(str, submodel_implementations))}); install() needs one")
    name = ATTENTION_NAME + FALLBACK_SEPARATOR + current
    AttentionInterface.register(name, prefix_grouper_attention)
    AttentionMaskInterface.register(name, prefix_grouper_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r} (it keeps "
                           f"{model.config._attn_implementation!r}); its attention does not go through "
                           f"transformers' AttentionInterface")
    return name


# ---------------------------------------------------------------------------- grouped calls (the paper's API)


def paper_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, *args, prefix_grouper=None,
                            prefix_grouper_attn_func: str = "flash_attention_2", **kwargs):
    """transformers attention function ``"prefix_grouper_attention"``: ``(output [b, seq, heads, head_dim], None)``.

    Every call carries ``prefix_grouper=`` (the grouper's rows are the mask); a call without
    it (``generate()``, evaluation) is refused, as in the paper's package: switch the model's
    attention implementation for those. ``prefix_grouper_attn_func=`` names the attention the
    paper's package calls twice per layer; it is accepted and unused (one call runs here).
    """
    if prefix_grouper is None:
        raise ValueError(f"attn_implementation={PAPER_ATTENTION_NAME!r} needs prefix_grouper= in every model call; "
                         f"for calls without one (generate, evaluation) set the model's attention implementation to "
                         f"{prefix_grouper_attn_func!r} (model.set_attn_implementation)")
    if not isinstance(prefix_grouper, GroupedRows):
        raise TypeError(f"prefix_grouper must be a prefix_grouper.PrefixGrouper, got {type(prefix_grouper).__name__}")
    return prefix_grouper.forward(None, query, key, value, module, *args, **kwargs), None


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
    """transformers' ``"eager"`` once :func:`route_eager_attention` ran: grouped attention for
    calls with ``prefix_grouper=``, the model's own eager attention, unchanged, for all others."""
    if prefix_grouper is None:
        return _own_eager_attention(module)(module, query, key, value, attention_mask, *args, **kwargs)
    return paper_attention_forward(module, query, key, value, attention_mask, *args, prefix_grouper=prefix_grouper,
                                   **kwargs)


def register_paper_attention() -> None:
    """Register ``"prefix_grouper_attention"`` (the paper's name) with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PAPER_ATTENTION_NAME, paper_attention_forward)


def route_eager_attention() -> None:
    """Make transformers' ``"eager"`` honor ``prefix_grouper=`` (idempotent; an ``"eager"``
    registered already, ours or a wrapper of it, is kept as it is).

    Models resolve ``"eager"`` to their modeling file's own function, which ignores unknown
    keywords: code that patches only ``ALL_ATTENTION_FUNCTIONS`` (verl's
    ``apply_prefix_grouper_patch``) would then run plain attention on the grouper's rows.
    Installed in one place: building a :class:`~prefix_grouper.PrefixGrouper` while
    transformers is loaded, before the model call that passes it.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if "eager" not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register("eager", eager_attention_dispatch)
