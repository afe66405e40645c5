"""Ground-truth shared-prefix attention: dense softmax under the explicit mask.

Slow and exact; every other backend is tested against it. It runs one segment (a prefix
or a completion) at a time against the keys of its group's prefix and of itself, so a
NaN/inf in one segment's K/V never meets another segment's rows: a single ``[T, T]``
product would multiply it by the zero probabilities of every row that masks it.
Autograd differentiates it, sinks included.
"""
from __future__ import annotations

import torch

from ..layout import GroupLayout


def prefix_sharing_mask(layout: GroupLayout, window: int | None = None) -> torch.Tensor:
    """``[T, T]`` bool, True where query token q (row) may attend to key token k (column).

    Same group, ``pos(k) <= pos(q)``, and k is either a prefix token or in q's own segment;
    with a ``window``, also ``pos(q) - window < pos(k)`` (positions within the unpacked row,
    so a completion's first tokens see the end of their prompt).
    """
    group, seg, pos = layout.token_group, layout.token_segment, layout.position_ids
    key_is_prefix = layout.token_completion < 0
    same_group = group[:, None] == group[None, :]
    causal = pos[None, :] <= pos[:, None]
    visible = key_is_prefix[None, :] | (seg[:, None] == seg[None, :])
    mask = same_group & causal & visible
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def _segment_keys(layout: GroupLayout) -> list[tuple[range, list[int]]]:
    """``(rows, keys)`` of every non-empty segment in packed order: its packed rows and the
    packed keys its rows may see (``layout.key_runs``: its group's prefix, then itself)."""
    segments = []
    for index in layout.segmentation.nonempty():
        start, length, _ = layout.segments[index]
        keys = [key for run_start, run_length in layout.key_runs(index)
                for key in range(run_start, run_start + run_length)]
        segments.append((range(start, start + length), keys))
    return segments


def reference_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float, *,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in fp32 (fp64 for fp64 inputs).

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0``.
        window: keys with ``pos(k) <= pos(q) - window`` are masked too (None: none).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the mask.
        sinks: ``[Hq]`` logits, one extra softmax column per head with no value (not
            scaled or capped).

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32/float64)``; lse includes the sink.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq, hkv = q.shape[1], k.shape[1]
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(hq // hkv, dim=1)
    vf = v.to(compute).repeat_interleave(hq // hkv, dim=1)
    sink = None if sinks is None else sinks.to(compute)
    mask = prefix_sharing_mask(layout, window).to(q.device)
    outs, lses = [], []
    for rows, keys in _segment_keys(layout):
        keys = torch.tensor(keys, device=q.device)
        rows = torch.arange(rows.start, rows.stop, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", qf[rows], kf[keys]) * softmax_scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask[rows][:, keys], float("-inf"))
        logits = scores if sink is None else torch.cat([scores, sink[:, None, None].expand(-1, len(rows), 1)], -1)
        lse = torch.logsumexp(logits, dim=-1)  # every row sees at least itself
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), vf[keys]))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
