"""Ground-truth shared-prefix attention: dense softmax under the explicit mask.

Slow and exact; every other backend is tested against it. It runs one segment at a time
against the keys of its path (``layout.key_runs``: its ancestors' runs, root first, then
itself), so a NaN/inf in one segment's K/V never meets the rows of tokens outside its
subtree: a single ``[T, T]`` product would multiply it by the zero probabilities of every
row that masks it. Autograd differentiates it, sinks included. Any layout: a one-level
batch (a prompt and its completions) is the depth-1 prefix tree.
"""
from __future__ import annotations

import torch

from ..layout import GroupLayout


def prefix_sharing_mask(layout: GroupLayout, window: int | None = None) -> torch.Tensor:
    """``[T, T]`` bool, True where query token q (row) may attend to key token k (column).

    k's segment is q's or one of its ancestors, and ``pos(k) <= pos(q)``: in the packed
    pre-order, exactly ``k <= q < subtree_end(segment of k)``. With a ``window``, also
    ``pos(q) - window < pos(k)`` (positions along the unpacked sequence, so a segment's
    first tokens see the end of its parent).
    """
    segmentation = layout.segmentation
    device = layout.position_ids.device
    subtree_ends = torch.tensor([segmentation.subtree_end(s) for s in range(len(segmentation))],
                                dtype=torch.long, device=device)
    tokens = torch.arange(layout.total_tokens, device=device)
    key_subtree_end = subtree_ends[layout.token_segment]
    mask = (tokens[None, :] <= tokens[:, None]) & (tokens[:, None] < key_subtree_end[None, :])
    # A window longer than every sequence hides nothing; skipping it also keeps a huge one
    # (2**70, accepted as "no limit" like the other backends) out of int64 tensor math.
    if window is not None and layout.total_tokens and window <= int(layout.position_ids.max()):
        pos = layout.position_ids
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def _segment_keys(layout: GroupLayout) -> list[tuple[range, list[int], int]]:
    """``(rows, keys, first_position)`` of every non-empty segment in packed order: its
    packed rows, the packed keys of its path (key ``j`` of the list sits at position ``j``
    of the row's sequence) and the position of its first row."""
    segmentation = layout.segmentation
    segments = []
    for index in segmentation.nonempty():
        start, length, _ = segmentation.segments[index]
        keys = [key for run_start, run_length in segmentation.key_runs(index)
                for key in range(run_start, run_start + run_length)]
        segments.append((range(start, start + length), keys, segmentation.first_positions[index]))
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
    outs, lses = [], []
    for rows, keys, first_position in _segment_keys(layout):
        key_pos = torch.arange(len(keys), device=q.device)
        query_pos = torch.arange(first_position, first_position + len(rows), device=q.device)
        visible = key_pos[None, :] <= query_pos[:, None]
        if window is not None and window < first_position + len(rows):  # else it hides nothing (see above)
            visible &= key_pos[None, :] > query_pos[:, None] - window
        keys = torch.tensor(keys, device=q.device)
        rows = torch.arange(rows.start, rows.stop, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", qf[rows], kf[keys]) * softmax_scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~visible, float("-inf"))
        logits = scores if sink is None else torch.cat([scores, sink[:, None, None].expand(-1, len(rows), 1)], -1)
        lse = torch.logsumexp(logits, dim=-1)  # every row sees at least itself
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), vf[keys]))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs).to(q.dtype), torch.cat(lses)
