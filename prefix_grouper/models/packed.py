"""The packed forward: completion logits, hidden states and log-probs from one pass per batch."""
from __future__ import annotations

import torch

from ..checks import check_bool, check_positive_real
from ..layout import GroupLayout
from ..logprobs import fused_linear_log_probs
from ..logprobs.tokens import token_log_probs
from .attention import BACKEND_KWARG, LAYOUT_KWARG, PACKED_CALL, PackedCall, install
from .heads import fused_head

__all__ = ["completion_hidden_states", "completion_log_probs", "completion_logits", "packed_forward"]


def packed_forward(model, module, layout: GroupLayout, prompt_ids, completion_ids, backend: str,
                   **call_kwargs):
    """``module(...)`` (``model`` or its body) on the packed row with prefix attention:
    ``(module's output, input_ids [T])``. ``call_kwargs`` go to the module call (e.g.
    ``logits_to_keep``). Refuses a run in which no attention layer took the packed path, or
    whose sliding-window mask no attention layer received.

    The building block of :func:`completion_logits` and :func:`completion_hidden_states`,
    public for integrations that call the model their own way (verl's engine)."""
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    install(model)
    input_ids = layout.pack(prompt_ids, completion_ids)
    packed_call = PackedCall()
    token = PACKED_CALL.set(packed_call)
    try:
        output = module(input_ids=input_ids[None], position_ids=layout.position_ids[None], use_cache=False,
                        **call_kwargs, **{LAYOUT_KWARG: layout, BACKEND_KWARG: backend})
    finally:
        PACKED_CALL.reset(token)
    packed_call.check(model)
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
    output, input_ids = packed_forward(model, model, layout, prompt_ids, completion_ids, backend,
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
    output, input_ids = packed_forward(model, body, layout, prompt_ids, completion_ids, backend)
    hidden = getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{type(body).__name__} (the body of {type(model).__name__}) returned "
                        f"{type(output).__name__} without a last_hidden_state tensor")
    return hidden[0, layout.completion_logit_positions()], input_ids[layout.completion_positions()]


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
        head, head_temperature = fused_head(model, temperature)
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
