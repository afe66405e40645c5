"""Hugging Face transformers: shared-prefix attention as an attention implementation.

Usage (any model whose attention layers go through ``ALL_ATTENTION_FUNCTIONS``, e.g.
Llama, Qwen2/3, Mistral, Gemma)::

    from prefix_grouper.integrations.transformers import completion_log_probs

    log_probs, mask = completion_log_probs(model, layout, prompt_ids, completion_ids)  # [N, max_S]
    log_probs, entropy, mask = completion_log_probs(model, layout, prompt_ids, completion_ids,
                                                    fused=True, return_entropy=True)

The model runs once over the packed ``prompt, completion_1..completion_G`` axis of each
group, with the layout's position ids and the model-call keyword ``prefix_layout=layout``;
logits are computed only at the positions that predict completion tokens. With
``fused=True`` the model's body runs without its LM head, and
:func:`prefix_grouper.fused_linear_log_probs` applies the head to the completion positions'
hidden states one chunk at a time, never holding ``[num_completion_tokens, vocab]`` logits.

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
from ..checks import check_bool, check_positive_real
from ..layout import GroupLayout
from ..logprobs import fused_linear_log_probs

ATTENTION_NAME = "prefix_grouper"
LAYOUT_KWARG = "prefix_layout"
BACKEND_KWARG = "prefix_backend"
# "prefix_grouper+sdpa": the dispatching implementation over sdpa. Not "|": transformers
# reads "a|b" as a hub-kernel name.
_FALLBACK_SEPARATOR = "+"

__all__ = [
    "ATTENTION_NAME",
    "completion_hidden_states",
    "completion_log_probs",
    "completion_logits",
    "install",
    "prefix_grouper_attention",
    "prefix_grouper_mask",
    "register",
    "token_log_probs",
]

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

# Set by _packed_forward for the duration of its model (or body) call: the list of attention
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
    query, key, value = (x[0].transpose(0, 1) for x in (query, key, value))
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast, rotary embeddings leave q and k in float32 while v is in the autocast
        # dtype; sdpa, an autocast op, runs in the autocast dtype, and so does this.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = prefix_attention(query, key, value, layout, softmax_scale=scaling,
                           backend=kwargs.get(BACKEND_KWARG, "auto"))
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


def _packed_forward(model, module, layout: GroupLayout, prompt_ids, completion_ids, backend: str,
                    **call_kwargs):
    """``module(...)`` (``model`` or its body) on the packed row with prefix attention:
    ``(module's output, input_ids [T])``. Refuses a run in which no attention layer took
    the packed path."""
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    install(model)
    input_ids = layout.pack(prompt_ids, completion_ids)
    attention_calls: list = []
    token = _PACKED_CALL.set(attention_calls)
    try:
        output = module(input_ids=input_ids[None], position_ids=layout.position_ids[None], use_cache=False,
                        **call_kwargs, **{LAYOUT_KWARG: layout, BACKEND_KWARG: backend})
    finally:
        _PACKED_CALL.reset(token)
    if not attention_calls:
        raise RuntimeError(f"no attention layer of {type(model).__name__} ran prefix_grouper's attention: the "
                           f"packed row went through plain causal attention, and its log-probs would be wrong")
    return output, input_ids


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
    output, input_ids = _packed_forward(model, model, layout, prompt_ids, completion_ids, backend,
                                        logits_to_keep=layout.completion_logit_positions())
    return output.logits[0], input_ids[layout.completion_positions()]


def completion_hidden_states(model, layout: GroupLayout, prompt_ids, completion_ids, *,
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states that predict every completion token, from one packed forward
    pass of the model's body (``model.get_decoder()``), without its LM head.

    Takes the arguments of :func:`completion_logits`. Returns ``(hidden
    [num_completion_tokens, hidden_size] in the model's dtype, targets
    [num_completion_tokens] int64)``, completion after completion: the LM head's input at
    the rows where :func:`completion_logits` returns its output.
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or body is model:
        raise TypeError(f"model must be a transformers causal LM whose get_decoder() returns its body without "
                        f"the LM head, got {type(model).__name__} (body {type(body).__name__})")
    output, input_ids = _packed_forward(model, body, layout, prompt_ids, completion_ids, backend)
    hidden = getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{type(body).__name__} (the body of {type(model).__name__}) returned "
                        f"{type(output).__name__} without a last_hidden_state tensor")
    return hidden[0, layout.completion_logit_positions()], input_ids[layout.completion_positions()]


def _fused_head(model, temperature: float) -> tuple[torch.nn.Linear, float]:
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


def completion_log_probs(
    model,
    layout: GroupLayout,
    prompt_ids,
    completion_ids,
    *,
    backend: str = "auto",
    temperature: float = 1.0,
    fused: bool = False,
    return_entropy: bool = False,
):
    """Per-token log-probs (and entropies) of every completion, from one packed forward pass.

    Args:
        model: a transformers causal LM; :func:`install` is applied to it (its other calls,
            ``generate()`` included, keep their attention).
        layout: the batch's :class:`GroupLayout` on the model's device.
        prompt_ids: ``[B, Lp]`` or ``[N, Lp]`` left-padded, or a list of B or N tensors.
        completion_ids: ``[N, Ls]`` right-padded or a list of N tensors ``[S_j]``.
        backend: the :func:`prefix_attention` backend.
        temperature: positive; logits are divided by it (as GRPO trainers do with the
            sampling temperature).
        fused: run the model's body only (:func:`completion_hidden_states`) and apply its LM
            head with :func:`prefix_grouper.fused_linear_log_probs`, one chunk of logits at a
            time. A logit scaling of the model's forward (Cohere's ``logit_scale``, Granite's
            ``logits_scaling``) is folded into the temperature; final-logit softcapping
            (Gemma 2) is refused.
        return_entropy: also return the entropy of every token's distribution.

    Returns ``(log_probs [N, max_S], mask [N, max_S] bool)``, or ``(log_probs, entropy
    [N, max_S], mask)`` with ``return_entropy=True``; values are float32 (float64 for a
    float64 model), zeros where padded.
    """
    temperature = check_positive_real(temperature, "temperature")
    check_bool(fused, "fused")
    check_bool(return_entropy, "return_entropy")
    if fused:
        head, head_temperature = _fused_head(model, temperature)
        hidden, targets = completion_hidden_states(model, layout, prompt_ids, completion_ids, backend=backend)
        per_token = fused_linear_log_probs(hidden, head.weight, targets, bias=head.bias,
                                           temperature=head_temperature, return_entropy=return_entropy)
    else:
        logits, targets = completion_logits(model, layout, prompt_ids, completion_ids, backend=backend)
        per_token = token_log_probs(logits, targets, temperature, return_entropy=return_entropy)
    if not return_entropy:
        return layout.unpack_completions(per_token)
    log_probs, mask = layout.unpack_completions(per_token[0])
    return log_probs, layout.unpack_completions(per_token[1])[0], mask
