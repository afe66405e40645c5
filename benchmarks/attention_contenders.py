"""The attention suite's contenders other than prefix_attention itself: the approaches users
would pick instead, each preparing its own inputs once and running what gets timed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Approach", "LoopedOut", "flex_for_layout", "looped_rows", "make_flex", "run_looped", "run_split"]


@dataclass
class Approach:
    """``prepare`` turns packed q/k/v into the approach's own input layout once (outside the
    timed region, as a model would hold them); ``run`` is what gets timed. ``backward``:
    whether ``run`` is differentiable on this device. ``unavailable``: why the approach cannot
    run this config here ("" where it runs): its row says so and holds no time."""

    prepare: Callable
    run: Callable | None
    backward: bool = True
    unavailable: str = ""


def run_split(q, k, v, layout):
    """Single-group, equal-length completions only (the scheme needs a rectangular batch)."""
    from torch.nn.attention.bias import causal_lower_right

    p, g = layout.prefix_lens_list[0], layout.group_sizes_list[0]
    s = layout.suffix_lens_list[0]
    hq, hkv = q.shape[1], k.shape[1]
    qp, kp, vp = (x[:p].transpose(0, 1)[None] for x in (q, k, v))
    prefix_out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
    qs = q[p:].reshape(g, s, hq, -1).transpose(1, 2)
    ks = torch.cat([kp.expand(g, -1, -1, -1), k[p:].reshape(g, s, hkv, -1).transpose(1, 2)], 2)
    vs = torch.cat([vp.expand(g, -1, -1, -1), v[p:].reshape(g, s, hkv, -1).transpose(1, 2)], 2)
    suffix_out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(s, p + s),
                                                enable_gqa=True)
    return torch.cat([prefix_out[0].transpose(0, 1), suffix_out.transpose(1, 2).reshape(g * s, hq, -1)])


def flex_for_layout(layout):
    """``(block_mask, compiled flex_attention)`` for the layout's prefix-sharing pattern, after
    a compiler reset: every layout compiles flex_attention's one code object twice (no_grad,
    grad), and without a reset the layouts of one run together pass Dynamo's recompile limit
    (8), after which flex_attention would silently run its unfused eager path. fullgraph=True
    turns any such fallback into an error."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    group, segment, pos = layout.token_group, layout.token_segment, layout.position_ids
    is_prefix = layout.token_completion < 0

    def prefix_sharing(b, h, q_idx, kv_idx):
        return ((group[q_idx] == group[kv_idx]) & (pos[kv_idx] <= pos[q_idx])
                & (is_prefix[kv_idx] | (segment[q_idx] == segment[kv_idx])))

    t = layout.total_tokens
    torch.compiler.reset()
    # Compiled: the eager mask builder materializes [T, T] (67 GiB at ~90k tokens).
    block_mask = torch.compile(create_block_mask)(prefix_sharing, None, None, t, t, device=layout.device)
    return block_mask, torch.compile(flex_attention, dynamic=False, fullgraph=True)


def make_flex(layout):
    block_mask, compiled = flex_for_layout(layout)

    def run(q, k, v):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    return run


def looped_rows(q, k, v, layout):
    """Each sequence's own q/k/v rows ``[L_i, H, D]`` (unpadded), as a model holds them."""
    sequences = [layout.sequence_positions(i) for i in range(layout.num_sequences)]
    return tuple([x[i].contiguous() for i in sequences] for x in (q, k, v))


def run_looped(q_rows, k_rows, v_rows):
    """One causal SDPA call per row; the outputs stacked into one padded ``[N, L, H, D]`` (a
    view-free list would not fit the suite's one-tensor contract: the stack is timed too)."""
    outs = [F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in xs), is_causal=True,
                                           enable_gqa=True)[0].transpose(0, 1) for xs in zip(q_rows, k_rows, v_rows)]
    return LoopedOut(outs)


class LoopedOut(list):
    """The looped rows' outputs: a list of ``[L_i, H, D]``, with the suite's ``backward``."""

    def backward(self, grad):
        torch.autograd.backward(list(self), list(grad))
