"""The attention implementation transformers calls: each layer's own settings passed through.

A packed call (one carrying ``prefix_layout=``) runs :func:`prefix_grouper.prefix_attention`
with the settings the layer passes in that call: ``scaling``, ``sliding_window`` (Mistral,
Qwen2 with ``use_sliding_window``, Gemma 2/3, gpt-oss), ``softcap`` (Gemma 2's
``attn_logit_softcapping``) and ``s_aux`` (gpt-oss's sinks). Gemma 2/3 and gpt-oss
alternate sliding and full layers, so the settings are read per call, never per model.
A keyword the attention does not implement raises an error that names it, so that a
model feature added later cannot be dropped silently.
"""
from __future__ import annotations

import contextvars
import math
import sys
from dataclasses import dataclass

import torch

from ..attention import prefix_attention
from ..layout import GroupLayout

__all__ = ["ATTENTION_NAME", "BACKEND_KWARG", "HARMLESS_KWARGS", "LAYOUT_KWARG", "install",
           "prefix_grouper_attention", "prefix_grouper_mask", "register"]

ATTENTION_NAME = "prefix_grouper"
LAYOUT_KWARG = "prefix_layout"
BACKEND_KWARG = "prefix_backend"
# "prefix_grouper+sdpa": the dispatching implementation over sdpa. Not "|": transformers
# reads "a|b" as a hub-kernel name.
_FALLBACK_SEPARATOR = "+"

# Keywords that reach the attention function (a model call's keywords travel down to every
# attention layer) and change nothing prefix_attention computes, as checked in the modeling
# files of transformers 5.10.4 and 5.24 for Llama, Qwen2/3, Mistral, Gemma 2/3, gpt-oss, GPT-2:
# position ids (the rotary embeddings already used them; the layout carries the packed
# row's own), the cache switch (a packed call runs without a cache), and the MoE router's
# output switch. Keywords that describe another packing (cu_seq_lens_*, max_length_*) are
# deliberately absent: the layout is the packing, and a second one cannot be honored.
HARMLESS_KWARGS = frozenset({"position_ids", "use_cache", "output_router_logits", LAYOUT_KWARG, BACKEND_KWARG})
# Keywords whose meaning is implemented: mapped to prefix_attention's arguments (is_causal
# must be True: the prefix-sharing mask is causal).
_IMPLEMENTED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux", "is_causal"})

# Config fields that hold a model's attention dropout probability, by name in transformers'
# configs (GPT-2, GPT-J, CodeGen: attn_pdrop; BERT-style: attention_probs_dropout_prob).
_ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")


@dataclass
class PackedCall:
    """One packed model call: how many attention calls ran prefix_attention in it."""
    attention_calls: int = 0

    def check(self, model) -> None:
        """Refuse a call in which the packed row went through attention prefix_grouper did not run."""
        if not self.attention_calls:
            raise RuntimeError(f"no attention layer of {type(model).__name__} ran prefix_grouper's attention: the "
                               f"packed row went through plain causal attention, and its log-probs would be wrong")


@dataclass(frozen=True)
class LocalMask:
    """The mask :func:`prefix_grouper_mask` gives a packed call's sliding-window (or chunked)
    layers in place of a dense one: its size, which the layer's own ``sliding_window`` must
    equal. A model that builds such a mask but does not pass its layer the window (or
    builds a chunked mask, which no window expresses) is refused instead of attending fully."""
    size: int


# Set by the packed forward for the duration of its model (or body) call.
PACKED_CALL: contextvars.ContextVar[PackedCall | None] = contextvars.ContextVar("prefix_grouper_packed_call",
                                                                               default=None)


def _fallback_of(implementation: str | None) -> str | None:
    """The previous implementation that :func:`install` recorded in the name, or None."""
    prefix = ATTENTION_NAME + _FALLBACK_SEPARATOR
    if isinstance(implementation, str) and implementation.startswith(prefix):
        return implementation[len(prefix):]
    return None


def _fallback_attention(fallback: str, module):
    from transformers import AttentionInterface

    if fallback == "eager":
        # Every modeling file defines its own eager attention (softcapping, sinks...).
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}'s module defines no eager_attention_forward to fall back to")
        return eager
    return AttentionInterface()[fallback]


def _dropout_error(module, dropout) -> ValueError:
    """The error for attention dropout in training, naming the config field that sets it."""
    config = getattr(module, "config", None)
    fields = [name for name in _ATTENTION_DROPOUT_FIELDS if isinstance(getattr(config, name, None), (int, float))]
    # The field whose value the layer passed, else any attention-dropout field the config has.
    matching = [name for name in fields if math.isclose(getattr(config, name), dropout)] or fields
    where = (f"set config.{matching[0]} = 0 on {type(config).__name__} before building the model"
             if matching else f"set {type(module).__name__}'s attention dropout to 0")
    return ValueError(
        f"attn_implementation='{ATTENTION_NAME}' does not implement attention dropout ({type(module).__name__} "
        f"passed dropout={dropout} in training mode): {where}, or disable every dropout of the loaded model "
        f"with prefix_grouper.trainers.model.disable_dropout(model) (as TRL's disable_dropout does); "
        f"RL policy updates run without dropout")


def _window(module, sliding_window) -> int | None:
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"{type(module).__name__} passed sliding_window={sliding_window!r}; prefix_grouper's "
                         f"attention takes an int >= 1 (a key is visible when q_pos - sliding_window < k_pos) "
                         f"or None")
    return sliding_window


def _layer_settings(module, kwargs: dict) -> dict:
    """prefix_attention's ``window``, ``softcap`` and ``sinks`` from one call's keywords."""
    unknown = sorted(set(kwargs) - HARMLESS_KWARGS - _IMPLEMENTED_KWARGS)
    if unknown:
        raise TypeError(f"{type(module).__name__} passed the attention keyword(s) {', '.join(unknown)}, which "
                        f"prefix_grouper's attention does not implement (it implements "
                        f"{', '.join(sorted(_IMPLEMENTED_KWARGS))} and ignores only "
                        f"{', '.join(sorted(HARMLESS_KWARGS))}); its result would differ from the model's own "
                        f"attention")
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if is_causal is not True:
        raise ValueError(f"{type(module).__name__} runs non-causal attention (is_causal={is_causal!r}, e.g. "
                         f"use_bidirectional_attention); prefix_grouper's attention is causal")
    return {"window": _window(module, kwargs.get("sliding_window")), "softcap": kwargs.get("softcap"),
            "sinks": kwargs.get("s_aux")}


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
    """transformers attention function: query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]``.

    A call with the model-call keyword ``prefix_layout=layout`` (the batch's
    :class:`GroupLayout`) runs :func:`prefix_attention` on the packed row with this layer's
    ``scaling``, ``sliding_window`` (as ``window``), ``softcap`` and ``s_aux`` (as
    ``sinks``); the optional ``prefix_backend`` picks its backend. Returns
    ``([1, T, Hq, D], None)`` as transformers expects. A call without it runs the
    implementation :func:`install` recorded, or raises under the strict ``"prefix_grouper"``.
    """
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        fallback = _fallback_of(getattr(getattr(module, "config", None), "_attn_implementation", None))
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
    if dropout and module.training:
        raise _dropout_error(module, dropout)
    settings = _layer_settings(module, kwargs)
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
    query, key, value = (x[0].transpose(0, 1) for x in (query, key, value))
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast, rotary embeddings leave q and k in float32 while v is in the autocast
        # dtype; sdpa, an autocast op, runs in the autocast dtype, and so does this.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = prefix_attention(query, key, value, layout, softmax_scale=scaling,
                           backend=kwargs.get(BACKEND_KWARG, "auto"), **settings)
    return out[None], None


def prefix_grouper_mask(*args, config=None, **kwargs):
    """transformers mask function of the dispatching implementation: none for a packed call
    (the layout is the mask), else the previous implementation's.

    In a packed call a sliding-window (or chunked) mask becomes a :class:`LocalMask` of its
    size, which the layers it reaches check against their ``sliding_window``; masks with
    extra rules (``or_mask_function`` / ``and_mask_function``, e.g. Gemma 3's bidirectional
    image tokens), which the layout does not express, are refused.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fallback = _fallback_of(getattr(config, "_attn_implementation", None))
    if fallback is None:
        raise ValueError(f"prefix_grouper_mask serves the implementations install() registers, got config "
                         f"{type(config).__name__} with attn_implementation "
                         f"{getattr(config, '_attn_implementation', None)!r}")
    packed_call = PACKED_CALL.get()
    if packed_call is not None:
        if kwargs.get("use_vmap"):
            # transformers asks for vmap exactly when a model adds its own mask function.
            raise ValueError(f"{type(config).__name__}'s model adds its own rules to the attention mask "
                             f"(or_mask_function / and_mask_function, e.g. bidirectional image tokens), which the "
                             f"prefix layout does not express; use the unpacked rows for such inputs")
        local_size = kwargs.get("local_size")
        return None if local_size is None else LocalMask(local_size)
    if fallback not in ALL_MASK_ATTENTION_FUNCTIONS:
        # What transformers itself does for an implementation without a mask function.
        return kwargs.get("attention_mask")
    return ALL_MASK_ATTENTION_FUNCTIONS[fallback](*args, config=config, **kwargs)


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
    if current == ATTENTION_NAME or _fallback_of(current) is not None:
        return current
    if not isinstance(current, str):
        raise TypeError(f"model must be a transformers model with config._attn_implementation set, got "
                        f"{type(model).__name__} with {current!r}")
    submodel_implementations = {getattr(getattr(m, "config", None), "_attn_implementation", current)
                                for m in model.modules() if hasattr(m, "set_attn_implementation")}
    if submodel_implementations != {current}:
        raise ValueError(f"model's submodels use several attention implementations "
                         f"({sorted(map(str, submodel_implementations))}); install() needs one")
    name = ATTENTION_NAME + _FALLBACK_SEPARATOR + current
    AttentionInterface.register(name, prefix_grouper_attention)
    AttentionMaskInterface.register(name, prefix_grouper_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r} (it keeps "
                           f"{model.config._attn_implementation!r}); its attention does not go through "
                           f"transformers' AttentionInterface")
    return name
