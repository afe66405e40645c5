"""Hugging Face transformers: shared-prefix attention as an attention implementation.

Usage (any model whose attention layers go through ``ALL_ATTENTION_FUNCTIONS``, e.g.
Llama, Qwen2/3, Mistral, Gemma)::

    from prefix_grouper.integrations.transformers import completion_log_probs

    log_probs, mask = completion_log_probs(model, layout, prompt_ids, completion_ids)  # [N, max_S]
    log_probs, entropy, mask = completion_log_probs(model, layout, prompt_ids, completion_ids,
                                                    fused=True, return_entropy=True)

On any layout, a prefix tree of whole sequences included (``GroupLayout.from_sequences``)::

    layout = GroupLayout.from_sequences(sequences)
    logits = packed_logits(model, layout, layout.pack_sequences(sequences))  # [T, vocab]
    log_probs, mask = sequence_log_probs(model, layout, layout.pack_sequences(sequences), completion_lens)

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

Each attention layer's own settings are honored per call: its ``scaling``, sliding window
(Mistral, Qwen2 with ``use_sliding_window``, Gemma 2/3, gpt-oss), logit softcap (Gemma 2)
and attention sinks (gpt-oss). A keyword the attention does not implement, non-causal
attention and attention dropout in training mode are refused with an error that names them.

The code lives in the core package :mod:`prefix_grouper.models` (``attention``: the attention
and mask functions, :func:`install`; ``packed``: the packed forward and its log-probs;
``heads``: the fused path's LM head) and :func:`token_log_probs` in
:mod:`prefix_grouper.logprobs.tokens`; this module is their public path. ``attention``
below is :mod:`prefix_grouper.models.attention` itself, so patching it patches the one the
model calls.
"""
from __future__ import annotations

from ...logprobs.tokens import token_log_probs
from ...models import attention
from ...models.attention import (ATTENTION_NAME, HARMLESS_KWARGS, install, prefix_grouper_attention,
                                 prefix_grouper_mask, register)
from ...models.packed import (completion_hidden_states, completion_log_probs, completion_logits, packed_logits,
                              sequence_log_probs)

__all__ = [
    "ATTENTION_NAME",
    "HARMLESS_KWARGS",
    "completion_hidden_states",
    "completion_log_probs",
    "completion_logits",
    "install",
    "packed_logits",
    "prefix_grouper_attention",
    "prefix_grouper_mask",
    "register",
    "sequence_log_probs",
    "token_log_probs",
]
