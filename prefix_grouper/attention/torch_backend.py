"""Efficient pure-PyTorch shared-prefix attention (differentiable, any device).

Two exact formulations on padded views of the packed axis:

* With the LSE (``need_lse=True``): three dense attentions merged by log-sum-exp,

  1. prefix queries -> their prefix keys, causal            ``[B, P_max, P_max]`` scores
  2. every suffix query of a group -> the group's prefix     ``[B, Q_max, P_max]`` scores
  3. every suffix query -> its own suffix keys, causal       ``[N, S_max, S_max]`` scores

  (``Q_max`` = most suffix tokens in one group); under GQA the query heads sharing a KV
  head are folded into one matmul instead of repeating K/V. No prefix K/V is copied per
  completion: apart from the attention matrices the extra memory is O(T) plus padding.
* Without it (the common case): two fused ``scaled_dot_product_attention`` calls, causal
  over the padded prefixes, and every completion's queries against
  ``[group prefix; own completion]`` under a boolean mask ``[N, S_max, P_max + S_max]``
  (cached per layout). SDPA's fused kernels never materialize the scores, which makes this
  path several times faster on CPU for ragged batches; it gathers the group's prefix K/V
  once per completion (``O(N * P_max)`` rows, the naive layout's K/V).

Containment of NaN/inf: a masked key still enters its row's ``probs @ V`` product with a
zero probability, and ``0 * NaN = NaN``. So no batch row mixes segments that must not see
each other (hence one row per completion, not per group, in the fused suffix call), and
padding gathers an appended zero row rather than the neighbouring tokens. A non-finite K/V of a
completion token then reaches only that completion's rows, one of a prefix token only its
group's rows, as in the naive layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import GroupLayout


def _padded_index(starts: torch.Tensor, lens: torch.Tensor, width: int, zero_row: int):
    """``[R, width]`` packed indices of R runs, ``zero_row`` where padded, and their validity."""
    cols = torch.arange(width, device=starts.device)
    valid = cols[None, :] < lens[:, None]
    return torch.where(valid, starts[:, None] + cols[None, :], zero_row), valid


def _with_zero_row(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [T, ...]`` in ``dtype`` with a zero row appended at index T, which padding gathers:
    a clamped neighbour token's NaN would otherwise reach a padded batch's rows through
    their zero probabilities (and their gradients)."""
    return torch.cat([x.to(dtype), x.new_zeros((1, *x.shape[1:]), dtype=dtype)])


def _plan(layout: GroupLayout) -> dict:
    """Gather/select indices between the packed axis and the three padded batches."""
    zero_row = layout.total_tokens
    group_suffix_starts = layout.prefix_starts + layout.prefix_lens
    group_suffix_lens = layout.cu_group_seqlens[1:] - group_suffix_starts
    prefix_idx, prefix_valid = _padded_index(layout.prefix_starts, layout.prefix_lens,
                                             layout.max_prefix_len, zero_row)
    group_idx, _ = _padded_index(group_suffix_starts, group_suffix_lens,
                                 layout.max_group_suffix_tokens, zero_row)
    own_idx, _ = _padded_index(layout.suffix_starts, layout.suffix_lens, layout.max_suffix_len, zero_row)

    # Where every packed token sits in each padded batch (flattened row * width + column).
    group, completion = layout.token_group, layout.token_completion
    is_prefix = completion < 0
    completion_safe = completion.clamp(min=0)
    arange_t = torch.arange(layout.total_tokens, device=layout.device)
    in_prefix = group * layout.max_prefix_len + layout.position_ids
    in_group = group * layout.max_group_suffix_tokens + (arange_t - group_suffix_starts[group])
    in_own = completion_safe * layout.max_suffix_len + (arange_t - layout.suffix_starts[completion_safe])
    zero = torch.zeros_like(arange_t)
    return {
        "prefix_idx": prefix_idx, "prefix_valid": prefix_valid,
        "group_idx": group_idx, "own_idx": own_idx,
        "is_prefix": is_prefix,
        "in_prefix": torch.where(is_prefix, in_prefix, zero),
        "in_group": torch.where(is_prefix, zero, in_group),
        "in_own": torch.where(is_prefix, zero, in_own),
    }


def _attend(q, k, v, mask, scale):
    """Masked softmax attention returning ``(out, lse)``.

    q ``[R, Lq, Hq, D]``, k/v ``[R, Lk, Hkv, D]``, mask broadcastable to ``[R, Lq, Lk]``.
    Every row must see at least one key; all three calls below guarantee it, padding rows
    included (P >= 1 and key 0 / the diagonal is always visible).
    Returns out ``[R, Lq, Hq, D]`` and lse ``[R, Lq, Hq]``.
    """
    r, lq, hq, d = q.shape
    hkv = k.shape[2]
    qg = (q * scale).reshape(r, lq, hkv, hq // hkv, d)
    scores = torch.einsum("rqhgd,rkhd->rhgqk", qg, k)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    out = torch.einsum("rhgqk,rkhd->rqhgd", torch.softmax(scores, -1), v).reshape(r, lq, hq, d)
    lse = torch.logsumexp(scores, -1)  # [R, Hkv, g, Lq]
    return out, lse.permute(0, 3, 1, 2).reshape(r, lq, hq)


def _gather(x, idx):
    # Advanced indexing, not index_select: its backward (index_put) is several times faster on CPU.
    return x[idx]


def _completion_keys_plan(layout: GroupLayout, plan: dict):
    """Keys ``[N, P_max + S_max]`` of every completion's queries (its group's prefix, then
    itself) and their mask ``[N, S_max, P_max + S_max]``: the valid prefix, then causal
    within the completion."""
    group = layout.completion_group
    own_idx = plan["own_idx"]
    width = own_idx.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=layout.device).tril()
    mask = torch.cat([plan["prefix_valid"][group][:, None, :].expand(-1, width, -1),
                      causal[None].expand(own_idx.shape[0], -1, -1)], 2)
    return torch.cat([plan["prefix_idx"][group], own_idx], 1), mask


def _fused_without_lse(qc, kc, vc, layout, plan, softmax_scale):
    def heads_first(x, idx):
        return _gather(x, idx).transpose(1, 2)  # [R, H, L, D]

    o_pre = F.scaled_dot_product_attention(
        *(heads_first(x, plan["prefix_idx"]) for x in (qc, kc, vc)), is_causal=True, scale=softmax_scale,
        enable_gqa=True).transpose(1, 2)
    hq, d = qc.shape[1:]
    o_pre = o_pre.reshape(-1, hq, d)[plan["in_prefix"]]
    if layout.num_completion_tokens == 0:
        return o_pre
    keys, mask = layout.cached(("torch_backend_completion_keys",),
                               lambda: _completion_keys_plan(layout, plan))
    o_suffix = F.scaled_dot_product_attention(
        heads_first(qc, plan["own_idx"]), heads_first(kc, keys), heads_first(vc, keys),
        attn_mask=mask[:, None], scale=softmax_scale, enable_gqa=True).transpose(1, 2)
    o_suffix = o_suffix.reshape(-1, hq, d)[plan["in_own"]]
    return torch.where(plan["is_prefix"][:, None, None], o_pre, o_suffix)


def torch_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared-prefix attention in plain PyTorch.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``, validated by the caller.
        need_lse: compute the LSE (exact three-part path); without it the fused SDPA path runs.

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32 (float64 for fp64 inputs) or
    None when not ``need_lse``)``. Half-precision inputs are computed in float32.
    """
    plan = layout.cached(("torch_backend_plan",), lambda: _plan(layout))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (_with_zero_row(x, compute) for x in (q, k, v))
    if not need_lse:
        return _fused_without_lse(qc, kc, vc, layout, plan, softmax_scale).to(q.dtype), None
    q_prefix, k_prefix, v_prefix = (_gather(x, plan["prefix_idx"]) for x in (qc, kc, vc))
    causal_prefix = torch.ones(layout.max_prefix_len, layout.max_prefix_len, dtype=torch.bool,
                               device=q.device).tril()
    o_pre, lse_pre = _attend(q_prefix, k_prefix, v_prefix, causal_prefix[None], softmax_scale)
    if layout.num_completion_tokens == 0:  # every completion empty: prefixes only
        return o_pre[plan["prefix_valid"]].to(q.dtype), lse_pre[plan["prefix_valid"]]

    q_group = _gather(qc, plan["group_idx"])
    o_cross, lse_cross = _attend(q_group, k_prefix, v_prefix, plan["prefix_valid"][:, None, :],
                                 softmax_scale)

    q_own, k_own, v_own = (_gather(x, plan["own_idx"]) for x in (qc, kc, vc))
    causal_own = torch.ones(layout.max_suffix_len, layout.max_suffix_len, dtype=torch.bool,
                            device=q.device).tril()
    o_own, lse_own = _attend(q_own, k_own, v_own, causal_own[None], softmax_scale)

    def to_packed(x, where):
        return x.reshape(-1, *x.shape[2:])[plan[where]]

    o_pre, lse_pre = to_packed(o_pre, "in_prefix"), to_packed(lse_pre, "in_prefix")
    o_cross, lse_cross = to_packed(o_cross, "in_group"), to_packed(lse_cross, "in_group")
    o_own, lse_own = to_packed(o_own, "in_own"), to_packed(lse_own, "in_own")

    lse_suffix = torch.logaddexp(lse_cross, lse_own)
    o_suffix = (o_cross * torch.exp(lse_cross - lse_suffix)[..., None]
                + o_own * torch.exp(lse_own - lse_suffix)[..., None])
    is_prefix = plan["is_prefix"]
    out = torch.where(is_prefix[:, None, None], o_pre, o_suffix)
    lse = torch.where(is_prefix[:, None], lse_pre, lse_suffix)
    return out.to(q.dtype), lse
