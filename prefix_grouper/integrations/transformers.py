"""Hugging Face transformers: shared-prefix attention as an attention implementation.

Usage (any model whose attention layers go through ``ALL_ATTENTION_FUNCTIONS``, e.g.
Llama, Qwen2/3, Mistral, Gemma)::

    from prefix_grouper.integrations.transformers import completion_log_probs

    log_probs, mask = completion_log_probs(model, layout, prompt_ids, completion_ids)  # [N, max_S]

The model runs once over the packed ``prompt, completion_1..completion_G`` axis of each
group, with the layout's position ids and the model-call keyword ``prefix_layout=layout``;
logits are computed only at the positions that predict completion tokens.

``completion_log_probs`` (and :func:`completion_logits`) first call :func:`install`, which
gives the model, once and for good, the attention implementation ``"prefix_grouper+<its
previous implementation>"``. It dispatches per call: a call that carries ``prefix_layout``
runs :func:`prefix_grouper.prefix_attention`; any other call (``generate()``, evaluation,
the unpacked baseline) runs the previous implementation with its own masks, unchanged.
Because the choice travels with the call's arguments and not with a switch that is undone
afterwards, a layer recomputed in the backward pass by gradient checkpointing makes the
same choice as in the forward pass.

``model.set_attn_implementation("prefix_grouper")`` (after :func:`register`) still selects
the strict implementation, which refuses every call without ``prefix_layout``.
"""
from __future__ import annotations

import contextvars
import sys

import torch

from ..attention import prefix_attention
from ..checks import check_positive_real
from ..layout import GroupLayout

ATTENTION_NAME = "prefix_grouper"
LAYOUT_KWARG = "prefix_layout"
BACKEND_KWARG = "prefix_backend"
# "prefix_grouper+sdpa": the dispatching implementation over sdpa. Not "|": transformers
# reads "a|b" as a hub-kernel name.
_FALLBACK_SEPARATOR = "+"

__all__ = [
    "ATTENTION_NAME",
    "completion_log_probs",
    "completion_logits",
    "install",
    "prefix_grouper_attention",
    "prefix_grouper_mask",
    "register",
    "token_log_probs",
]

# Set by completion_logits for the duration of its model call: the list of attention
# modules that ran prefix_attention (checked afterwards), and the sign for
# prefix_grouper_mask that no dense mask is needed.
_PACKED_CALL: contextvars.ContextVar[list | None] = contextvars.ContextVar("prefix_grouper_packed_call",
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


def prefix_grouper_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]``.

    A call with the model-call keyword ``prefix_layout=layout`` (the batch's
    :class:`GroupLayout`) runs :func:`prefix_attention` on the packed row; the optional
    ``prefix_backend`` picks its backend. Returns ``([1, T, Hq, D], None)`` as
    transformers expects. A call without it runs the implementation :func:`install`
    recorded, or raises under the strict ``"prefix_grouper"``.
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
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' runs on one packed row: expected query [1, heads, T, "
            f"head_dim], got {tuple(query.shape)}; pass input_ids=layout.pack(...)[None]"
        )
    if attention_mask is not None:
        raise ValueError(
            f"a {LAYOUT_KWARG}= call takes its mask from the layout, but the attention got a "
            f"{type(attention_mask).__name__} mask: do not pass attention_mask, and call the model through "
            f"completion_logits() / completion_log_probs(), which build no dense mask"
        )
    if dropout and module.training:
        raise ValueError(f"attn_implementation='{ATTENTION_NAME}' does not implement attention dropout ({dropout})")
    calls = _PACKED_CALL.get()
    if calls is not None:
        calls.append(module)
    out = prefix_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           layout, softmax_scale=scaling, backend=kwargs.get(BACKEND_KWARG, "auto"))
    return out[None], None


def prefix_grouper_mask(*args, config=None, **kwargs):
    """transformers mask function of the dispatching implementation: none for a packed call
    of :func:`completion_logits` (the layout is the mask), else the previous implementation's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fallback = _fallback_of(getattr(config, "_attn_implementation", None))
    if fallback is None:
        raise ValueError(f"prefix_grouper_mask serves the implementations install() registers, got config "
                         f"{type(config).__name__} with attn_implementation "
                         f"{getattr(config, '_attn_implementation', None)!r}")
    if _PACKED_CALL.get() is not None:
        return None
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


def completion_logits(model, layout: GroupLayout, prompt_ids, completion_ids, *,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict every completion token, from one packed forward pass.

    Args:
        model: a transformers causal LM; :func:`install` is applied to it.
        layout: the batch's :class:`GroupLayout` on the model's device.
        prompt_ids: ``[B, Lp]`` or ``[N, Lp]`` left-padded (one row per group, or one per
            completion as TRL and verl hold them), or a list of B or N tensors ``[P_b]``.
        completion_ids: ``[N, Ls]`` right-padded or a list of N tensors ``[S_j]``.
        backend: the :func:`prefix_attention` backend.

    Returns ``(logits [num_completion_tokens, vocab] in the model's dtype, targets
    [num_completion_tokens] int64)``, completion after completion.
    """
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    install(model)
    input_ids = layout.pack(prompt_ids, completion_ids)
    attention_calls: list = []
    token = _PACKED_CALL.set(attention_calls)
    try:
        logits = model(input_ids=input_ids[None], position_ids=layout.position_ids[None],
                       logits_to_keep=layout.completion_logit_positions(), use_cache=False,
                       **{LAYOUT_KWARG: layout, BACKEND_KWARG: backend}).logits[0]
    finally:
        _PACKED_CALL.reset(token)
    if not attention_calls:
        raise RuntimeError(f"no attention layer of {type(model).__name__} ran prefix_grouper's attention: the "
                           f"packed row went through plain causal attention, and its log-probs would be wrong")
    return logits, input_ids[layout.completion_positions()]


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` at ``targets``: logits ``[M, V]``, targets ``[M]`` -> ``[M]``.

    Computed in float32 (float64 for float64 logits) without a float32 copy of the logits;
    the division, skipped at temperature 1, stays in the logits' dtype as in TRL.
    """
    temperature = check_positive_real(temperature, "temperature")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating-point [M, vocab] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be a [M={logits.shape[0]}] tensor of token ids, got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return log_probs.gather(-1, targets[:, None])[:, 0]


def completion_log_probs(
    model,
    layout: GroupLayout,
    prompt_ids,
    completion_ids,
    *,
    backend: str = "auto",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of every completion, from one packed forward pass.

    Args:
        model: a transformers causal LM; :func:`install` is applied to it (its other calls,
            ``generate()`` included, keep their attention).
        layout: the batch's :class:`GroupLayout` on the model's device.
        prompt_ids: ``[B, Lp]`` or ``[N, Lp]`` left-padded, or a list of B or N tensors.
        completion_ids: ``[N, Ls]`` right-padded or a list of N tensors ``[S_j]``.
        backend: the :func:`prefix_attention` backend.
        temperature: positive; logits are divided by it (as GRPO trainers do with the
            sampling temperature).

    Returns ``(log_probs [N, max_S] float32 (float64 for a float64 model), mask [N, max_S] bool)``.
    """
    temperature = check_positive_real(temperature, "temperature")
    logits, targets = completion_logits(model, layout, prompt_ids, completion_ids, backend=backend)
    return layout.unpack_completions(token_log_probs(logits, targets, temperature))
