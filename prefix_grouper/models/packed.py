"""The packed forward: completion logits, hidden states and log-probs from one pass per batch."""
from __future__ import annotations

import torch

from ..checks import check_bool, check_positive_real
from ..layout import GroupLayout
from ..logprobs import fused_linear_log_probs
from ..logprobs.tokens import check_completion_lens, token_log_probs
from .attention import BACKEND_KWARG, LAYOUT_KWARG, PACKED_CALL, PackedCall, install
from .heads import fused_head

__all__ = ["completion_hidden_states", "completion_log_probs", "completion_logits", "packed_forward", "packed_logits",
           "sequence_log_probs"]


def packed_forward(model, module, layout: GroupLayout, prompt_ids, completion_ids, backend: str,
                   **call_kwargs):
    """``module(...)`` (``model`` or its body) on the packed row with prefix attention:
    ``(module's output, input_ids [T])``. ``call_kwargs`` go to the module call (e.g.
    ``logits_to_keep``). Refuses a run in which no attention layer took the packed path, or
    whose sliding-window mask no attention layer received.

    The building block of :func:`completion_logits` and :func:`completion_hidden_states`,
    public for integrations that call the model their own way (verl's engine)."""
    _check_layout(layout)
    input_ids = layout.pack(prompt_ids, completion_ids)
    return _run_packed(model, module, layout, input_ids, backend, **call_kwargs), input_ids


def _run_packed(model, module, layout: GroupLayout, input_ids: torch.Tensor, backend: str, **call_kwargs):
    """``module(...)`` on the packed ``input_ids [T]`` with the layout's position ids, checked
    afterwards that attention really took the packed path."""
    install(model)
    packed_call = PackedCall()
    token = PACKED_CALL.set(packed_call)
    try:
        output = module(input_ids=input_ids[None], position_ids=layout.position_ids[None], use_cache=False,
                        **call_kwargs, **{LAYOUT_KWARG: layout, BACKEND_KWARG: backend})
    finally:
        PACKED_CALL.reset(token)
    packed_call.check(model)
    return output


def _check_layout(layout) -> None:
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")


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
            ``logits_scaling``) is folded into the temperature; a final-logit softcapping
            (Gemma 2) is applied by the fused kernels.
        return_entropy: also return the entropy of every token's distribution.

    Returns ``(log_probs [N, max_S], mask [N, max_S] bool)``, or ``(log_probs, entropy
    [N, max_S], mask)`` with ``return_entropy=True``; values are float32 (float64 for a
    float64 model), zeros where padded.
    """
    temperature = check_positive_real(temperature, "temperature")
    check_bool(fused, "fused")
    check_bool(return_entropy, "return_entropy")
    if fused:
        head, head_temperature, softcap = fused_head(model, temperature)
        hidden, targets = completion_hidden_states(model, layout, prompt_ids, completion_ids, backend=backend)
        per_token = fused_linear_log_probs(hidden, head.weight, targets, bias=head.bias, temperature=head_temperature,
                                           softcap=softcap, return_entropy=return_entropy)
    else:
        logits, targets = completion_logits(model, layout, prompt_ids, completion_ids, backend=backend)
        per_token = token_log_probs(logits, targets, temperature, return_entropy=return_entropy)
    if not return_entropy:
        return layout.unpack_completions(per_token)
    log_probs, mask = layout.unpack_completions(per_token[0])
    return log_probs, layout.unpack_completions(per_token[1])[0], mask


def _check_packed_ids(layout: GroupLayout, packed_ids) -> None:
    if (not isinstance(packed_ids, torch.Tensor) or packed_ids.dim() != 1 or packed_ids.dtype.is_floating_point
            or packed_ids.dtype.is_complex or packed_ids.dtype == torch.bool):
        shape = (f"a {tuple(packed_ids.shape)} {packed_ids.dtype} tensor" if isinstance(packed_ids, torch.Tensor)
                 else type(packed_ids).__name__)
        raise TypeError(f"packed_ids must be a 1-D integer tensor [T] (layout.pack_sequences(sequences)), got {shape}")
    if packed_ids.shape[0] != layout.total_tokens:
        raise ValueError(f"packed_ids has {packed_ids.shape[0]} tokens but the layout packs {layout.total_tokens}")
    if packed_ids.device != layout.device:
        raise ValueError(f"packed_ids is on {packed_ids.device} but the layout is on {layout.device}")


def packed_logits(model, layout: GroupLayout, packed_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """The model's logits for the packed tokens of any layout (a prefix tree included), from
    one packed forward pass.

    Args:
        model: a transformers causal LM; :func:`install` is applied to it.
        layout: a :class:`GroupLayout` on the model's device (``from_sequences``,
            ``from_lengths``, ``from_padded``).
        packed_ids: ``[T]`` the packed token ids (``layout.pack_sequences(sequences)``).
        positions: optional ``[K]`` long packed indices: only their logits are computed
            (e.g. the first tensor of ``layout.token_log_prob_positions(i)``).
        backend: the :func:`prefix_attention` backend.

    Returns ``[T, vocab]`` (or ``[K, vocab]``) in the model's dtype: row ``t`` is what the
    model predicts after packed token ``t``, i.e. after the sequence that ends at ``t``. Refuses
    a run in which no attention layer took the packed path.
    """
    _check_layout(layout)
    _check_packed_ids(layout, packed_ids)
    call_kwargs = {}
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype != torch.long:
            raise TypeError("positions must be a 1-D int64 tensor of packed indices")
        call_kwargs["logits_to_keep"] = positions
    return _run_packed(model, model, layout, packed_ids, backend, **call_kwargs).logits[0]


def _sequence_targets(layout: GroupLayout, completion_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``(logit positions, target positions)`` of the last ``completion_lens[i]`` tokens
    of every sequence ``i``, sequence after sequence."""
    logits_at, targets_at = [], []
    for i, count in enumerate(completion_lens):
        logit_positions, target_positions = layout.token_log_prob_positions(i)
        first = logit_positions.shape[0] - count
        if count < 0 or first < 0:
            raise ValueError(f"completion_lens[{i}] = {count}: sequence {i} has {logit_positions.shape[0] + 1} "
                             f"tokens, and its first token is never predicted (expected 0..{logit_positions.shape[0]})")
        logits_at.append(logit_positions[first:])
        targets_at.append(target_positions[first:])
    return torch.cat(logits_at), torch.cat(targets_at)


def sequence_log_probs(model, layout: GroupLayout, packed_ids: torch.Tensor, completion_lens, *,
                       backend: str = "auto", temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the last ``completion_lens[i]`` tokens of every sequence ``i`` of a
    ``from_sequences`` layout (its completion), from one packed forward pass: the tree
    counterpart of :func:`completion_log_probs`.

    Args:
        model, layout, packed_ids, backend: as for :func:`packed_logits`; ``layout`` packs
            ``layout.num_sequences`` sequences (e.g. prompt + completion each).
        completion_lens: one int per sequence, ``0 <= completion_lens[i] < L_i``.
        temperature: positive; logits are divided by it.

    Returns ``(log_probs [N, max_S], mask [N, max_S] bool)``, float32 (float64 for a float64
    model), zeros where padded; row ``i`` holds sequence ``i``'s scored tokens in order.
    """
    temperature = check_positive_real(temperature, "temperature")
    completion_lens = check_completion_lens(completion_lens, layout.num_sequences)
    _check_packed_ids(layout, packed_ids)
    logits_at, targets_at, mask, padded_index = layout.cached(
        ("sequence_targets", str(layout.device), tuple(completion_lens)),
        lambda: (*_sequence_targets(layout, completion_lens), *_padding(completion_lens, layout.device)))
    logits = packed_logits(model, layout, packed_ids, positions=logits_at, backend=backend)
    per_token = token_log_probs(logits, packed_ids[targets_at], temperature)
    # index_copy at host-built indices: a boolean-mask assignment would read a count back
    # from the device (a sync) on every call.
    values = per_token.new_zeros(mask.numel()).index_copy(0, padded_index, per_token)
    return values.view(mask.shape), mask


def _padding(lens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask [N, max_len] bool, flat index [sum(lens)] of every real entry)`` of rows of ``lens``."""
    width = max(lens, default=0)
    mask = torch.arange(width)[None, :] < torch.tensor(lens, dtype=torch.long).reshape(-1, 1)
    return mask.to(device), mask.flatten().nonzero().flatten().to(device)
