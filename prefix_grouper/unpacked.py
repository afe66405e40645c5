"""Unpacked baselines: every ``[prompt; completion]`` as its own row, the way a GRPO loop
without prefix sharing runs a batch.

Written once for the tests, the demo, the benchmarks and the trainers. Row ``j`` holds
``prefix_b; suffix_j`` (``b = layout.completion_group[j]``), right-padded to
``L = max_j (P_b + S_j)``; column ``c`` of a row is the token whose position id is ``c``.
The prefix is therefore computed once per completion (``layout.unpacked_tokens()`` tokens
in all), against ``layout.total_tokens`` for the packed layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_positive_real
from .layout import GroupLayout
from .logprobs.tokens import token_log_probs

__all__ = [
    "packed_from_unpacked",
    "unpacked_attention_rows",
    "unpacked_completion_log_probs",
    "unpacked_prefix_attention",
    "unpacked_rows",
]


def _check_packed(x, name: str, layout: GroupLayout) -> None:
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != layout.total_tokens:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [T={layout.total_tokens}, ...] on the packed axis, got {shape}")
    if x.device != layout.device:
        raise ValueError(f"{name} is on {x.device} but the layout is on {layout.device}")


def _row_index(layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index [N, L], valid [N, L] bool, packed [T])``: the packed index of every column of
    every row (clamped on padding, which ``valid`` marks False), and the flat
    ``row * L + column`` of every packed token, a prefix token read from its group's first row."""
    group = layout.completion_group
    prefix_len = layout.prefix_lens[group][:, None]
    lengths = layout.prefix_lens[group] + layout.suffix_lens
    width = max(p + max(g) for p, g in zip(layout.prefix_lens_list, layout.suffix_lens_per_group))
    columns = torch.arange(width, device=layout.device)[None, :]
    index = torch.where(columns < prefix_len, layout.prefix_starts[group][:, None] + columns,
                        layout.suffix_starts[:, None] + columns - prefix_len)
    row = torch.where(layout.token_completion >= 0, layout.token_completion,
                      layout.first_completion[layout.token_group])
    return index.clamp(max=layout.total_tokens - 1), columns < lengths[:, None], row * width + layout.position_ids


def _cached_row_index(layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layout.cached("unpacked_row_index", lambda: _row_index(layout))


def unpacked_rows(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed per-token values as unpacked rows.

    Args:
        x: ``[T, ...]`` on the packed axis (input ids, hidden states, q/k/v...).
        layout: the packed batch.

    Returns ``(rows [N, L, ...], lengths [N] int64)``, zeros on the right padding. Every
    row holds its own copy of the prefix, so gradients into ``x`` sum over the G copies.
    """
    _check_packed(x, "x", layout)
    index, valid, _ = _cached_row_index(layout)
    rows = x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])
    rows = torch.where(valid.view(*valid.shape, *(1,) * (x.dim() - 1)), rows, torch.zeros((), dtype=x.dtype,
                                                                                         device=x.device))
    return rows, valid.sum(1)


def packed_from_unpacked(rows: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Inverse of :func:`unpacked_rows`: ``rows [N, L, ...]`` back to ``[T, ...]``.

    Completion tokens come from their own row, prefix tokens from the first row of their
    group (in a causal model every row computes the same prefix values).
    """
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    index, _, packed = _cached_row_index(layout)
    if not isinstance(rows, torch.Tensor) or rows.dim() < 2 or tuple(rows.shape[:2]) != tuple(index.shape):
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"rows must be [N, L, ...] = [{index.shape[0]}, {index.shape[1]}, ...] (unpacked_rows' "
                         f"shape for this layout), got {shape}")
    flat = rows.reshape(-1, *rows.shape[2:])
    return flat.index_select(0, packed.to(rows.device))


def unpacked_attention_rows(q_rows: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                            softmax_scale: float | None = None) -> torch.Tensor:
    """Causal SDPA on right-padded rows: q ``[N, L, Hq, D]``, k/v ``[N, L, Hkv, D]`` -> ``[N, L, Hq, D]``.

    Real tokens never attend to the right padding (it comes after them); outputs on the
    padding are meaningless. ``softmax_scale`` defaults to ``1/sqrt(D)``.
    """
    for name, x in (("q_rows", q_rows), ("k_rows", k_rows), ("v_rows", v_rows)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [N, L, heads, head_dim], got {shape}")
    if softmax_scale is not None:
        softmax_scale = check_positive_real(softmax_scale, "softmax_scale")
    out = F.scaled_dot_product_attention(q_rows.transpose(1, 2), k_rows.transpose(1, 2), v_rows.transpose(1, 2),
                                         is_causal=True, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def unpacked_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout,
                              softmax_scale: float | None = None) -> torch.Tensor:
    """What :func:`prefix_grouper.prefix_attention` computes, the unpacked way.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` on the packed axis of ``layout``.

    Returns ``[T, Hq, D]``: each ``[prefix; suffix_i]`` through causal SDPA on its own,
    written back to the packed axis (prefix outputs from the group's first row). Gradients
    reach q/k/v; a prefix token's gradient is the sum over its G copies.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_packed(x, name, layout)
    rows = [unpacked_rows(x, layout)[0] for x in (q, k, v)]
    return packed_from_unpacked(unpacked_attention_rows(*rows, softmax_scale=softmax_scale), layout)


def unpacked_completion_log_probs(model, layout: GroupLayout, prompt_ids, completion_ids, *,
                                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefix_grouper.models.completion_log_probs`, the unpacked way.

    Runs N right-padded rows ``[prompt; completion]`` with an attention mask through the
    model's own attention implementation (the model is not changed). Takes the same
    arguments: ``prompt_ids`` ``[B or N, Lp]`` left-padded or a list of B or N tensors,
    ``completion_ids`` ``[N, Ls]`` right-padded or a list of N tensors.

    Returns ``(log_probs [N, max_S] float32 (float64 for a float64 model), mask [N, max_S] bool)``.
    """
    temperature = check_positive_real(temperature, "temperature")
    input_ids = layout.pack(prompt_ids, completion_ids)
    rows, lengths = unpacked_rows(input_ids, layout)
    columns = torch.arange(rows.shape[1], device=rows.device)
    positions = layout.completion_positions()
    # Token at position id c of its row is predicted by column c - 1 of that row. Logits are
    # kept for the narrowest column window that holds every predicting column.
    first = min(layout.prefix_lens_list) - 1
    logits = model(input_ids=rows, attention_mask=(columns[None] < lengths[:, None]).long(),
                   logits_to_keep=columns[first:-1], use_cache=False).logits
    predicting = logits[layout.token_completion[positions], layout.position_ids[positions] - 1 - first]
    return layout.unpack_completions(token_log_probs(predicting, input_ids[positions], temperature))
