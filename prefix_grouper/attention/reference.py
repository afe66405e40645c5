"""Ground-truth shared-prefix attention: dense softmax under the explicit mask.

Slow and exact; every other backend is tested against it. It runs one segment (a prefix
or a completion) at a time against the keys of its group's prefix and of itself, so a
NaN/inf in one segment's K/V never meets another segment's rows: a single ``[T, T]``
product would multiply it by the zero probabilities of every row that masks it.
"""
from __future__ import annotations

import torch

from ..layout import GroupLayout


def prefix_sharing_mask(layout: GroupLayout) -> torch.Tensor:
    """``[T, T]`` bool, True where query token q (row) may attend to key token k (column).

    Same group, ``pos(k) <= pos(q)``, and k is either a prefix token or in q's own segment.
    """
    group, seg, pos = layout.token_group, layout.token_segment, layout.position_ids
    key_is_prefix = layout.token_completion < 0
    same_group = group[:, None] == group[None, :]
    causal = pos[None, :] <= pos[:, None]
    visible = key_is_prefix[None, :] | (seg[:, None] == seg[None, :])
    return same_group & causal & visible


def _segment_keys(layout: GroupLayout) -> list[tuple[range, list[int]]]:
    """``(rows, keys)`` of every non-empty segment in packed order: its packed rows and the
    packed keys its rows may see (its group's prefix, then itself for a completion)."""
    segments, start = [], 0
    for prefix_len, suffix_lens in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        prefix = range(start, start + prefix_len)
        segments.append((prefix, list(prefix)))
        start += prefix_len
        for suffix_len in suffix_lens:
            suffix = range(start, start + suffix_len)
            if suffix_len:
                segments.append((suffix, [*prefix, *suffix]))
            start += suffix_len
    return segments


def reference_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in fp32 (fp64 for fp64 inputs).

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0``.

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32/float64)``.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hkv = q.shape[1], k.shape[1]
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(hq // hkv, dim=1)
    vf = v.to(compute).repeat_interleave(hq // hkv, dim=1)
    mask = prefix_sharing_mask(layout).to(q.device)
    outs, lses = [], []
    for rows, keys in _segment_keys(layout):
        keys = torch.tensor(keys, device=q.device)
        rows = torch.arange(rows.start, rows.stop, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", qf[rows], kf[keys]) * softmax_scale
        scores = scores.masked_fill(~mask[rows][:, keys], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # every row sees at least itself
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), vf[keys]))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
