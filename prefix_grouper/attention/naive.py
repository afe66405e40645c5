"""Ground-truth shared-prefix attention: dense softmax under the explicit mask.

Slow (materializes ``[Hq, T, T]`` scores) and exact; every other backend is tested
against it.
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
    qf = q.to(compute).transpose(0, 1)  # [Hq, T, D]
    kf = k.to(compute).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    vf = v.to(compute).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * softmax_scale
    scores = scores.masked_fill(~prefix_sharing_mask(layout).to(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # every row sees at least itself
    out = torch.matmul(torch.exp(scores - lse[..., None]), vf)
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1)
