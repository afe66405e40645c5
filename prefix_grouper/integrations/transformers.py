"""Hugging Face transformers: shared-prefix attention as an attention implementation.

Usage (any model whose attention layers go through ``ALL_ATTENTION_FUNCTIONS``, e.g.
Llama, Qwen2/3, Mistral, Gemma)::

    from prefix_grouper.integrations.transformers import completion_log_probs, register

    register()                                    # once; adds attn_implementation "prefix_grouper"
    model.set_attn_implementation("prefix_grouper")
    logp = completion_log_probs(model, layout, prompt_ids, completion_ids)   # [N, max_S], mask

The model then runs once over the packed ``prompt, completion_1..completion_G`` axis of
each group with the layout's position ids; every attention layer calls
:func:`prefix_grouper.prefix_attention`. Logits are computed only at the positions that
predict completion tokens.
"""
from __future__ import annotations

import torch

from ..attention import prefix_attention
from ..layout import GroupLayout

ATTENTION_NAME = "prefix_grouper"
LAYOUT_KWARG = "prefix_layout"
BACKEND_KWARG = "prefix_backend"

__all__ = ["ATTENTION_NAME", "completion_log_probs", "prefix_grouper_attention", "register"]


def prefix_grouper_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]``.

    Needs the batch's layout as the model-call keyword ``prefix_layout``; the optional
    ``prefix_backend`` picks the :func:`prefix_attention` backend. Returns
    ``([1, T, Hq, D], None)`` as transformers expects.
    """
    layout = kwargs.get(LAYOUT_KWARG)
    if not isinstance(layout, GroupLayout):
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' needs the batch's GroupLayout: call the model with "
            f"{LAYOUT_KWARG}=layout (got {type(layout).__name__})"
        )
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' runs on one packed row: expected query [1, heads, T, "
            f"head_dim], got {tuple(query.shape)}; pass input_ids=layout.pack(...)[None]"
        )
    if attention_mask is not None:
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' builds its mask from the layout; do not pass attention_mask"
        )
    if dropout and module.training:
        raise ValueError(f"attn_implementation='{ATTENTION_NAME}' does not implement attention dropout ({dropout})")
    out = prefix_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                           layout, softmax_scale=scaling, backend=kwargs.get(BACKEND_KWARG, "auto"))
    return out[None], None


def register() -> None:
    """Register ``attn_implementation="prefix_grouper"`` with transformers (idempotent).

    Models with this implementation get no attention mask from transformers (the layout is
    the mask), so they must be called with ``prefix_layout=...``.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_grouper_attention)


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
        model: a transformers causal LM set to ``attn_implementation="prefix_grouper"``.
        layout: the batch's :class:`GroupLayout` on the model's device.
        prompt_ids: ``[B, Lp]`` left-padded or a list of B tensors ``[P_b]``.
        completion_ids: ``[N, Ls]`` right-padded or a list of N tensors ``[S_j]``.
        temperature: logits are divided by it (as GRPO trainers do with the sampling
            temperature).

    Returns ``(log_probs [N, max_S] float32 (float64 for a float64 model), mask [N, max_S] bool)``.
    """
    input_ids = layout.pack(prompt_ids, completion_ids)
    logits = model(
        input_ids=input_ids[None],
        position_ids=layout.position_ids[None],
        logits_to_keep=layout.completion_logit_positions(),
        use_cache=False,
        **{LAYOUT_KWARG: layout, BACKEND_KWARG: backend},
    ).logits[0]
    targets = input_ids[layout.completion_positions()]
    compute = torch.promote_types(logits.dtype, torch.float32)  # half logits: log-softmax in fp32
    log_probs = torch.log_softmax(logits.to(compute) / temperature, dim=-1)
    token_log_probs = log_probs.gather(-1, targets[:, None])[:, 0]
    return layout.unpack_completions(token_log_probs)
