"""Score transforms of the optional attention features, shared by the forward and backward
Triton kernels.

* softcap: ``s = softcap * tanh(softmax_scale * q.k / softcap)``. The kernels keep scores in
  the log2 domain, so the tanh takes the natural-scale score and its result is scaled by
  ``softcap * log2(e)``; the backward multiplies dS by ``1 - tanh^2``.
* window: a key is visible from a query when ``pos(q) - window < pos(k)``. Within one run of
  keys (an ancestor's segment, or the query's own) positions advance with the packed
  index, so the keys a tile sees form one interval per run; :func:`window_blocks` turns its
  bounds into the blocks a loop visits and the blocks it must mask.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..triton_math import tanh


@triton.jit
def softcapped_scores(dots, score_scale, softcap_log2, SOFTCAP: tl.constexpr):
    """``(scores, capped)``: log2-domain scores of the raw ``q.k`` products ``dots``.

    Without ``SOFTCAP``, ``scores = dots * score_scale`` (``score_scale`` = softmax scale *
    log2(e)) and ``capped`` is unused. With it, ``score_scale`` = softmax scale / softcap,
    ``capped = tanh(dots * score_scale)`` and ``scores = capped * softcap_log2``
    (``softcap_log2`` = softcap * log2(e)).
    """
    if SOFTCAP:
        capped = tanh(dots * score_scale)
        scores = capped * softcap_log2
    else:
        capped = dots
        scores = dots * score_scale
    return scores, capped


@triton.jit
def window_blocks(run_start, run_end, lowest_key, lowest_full_key, BLOCK_N: tl.constexpr):
    """``(first, band_end)`` of run ``[run_start, run_end)`` whose blocks start at
    ``run_start + n * BLOCK_N``: ``first`` is the block holding ``lowest_key``, the first key
    any row of the tile sees (earlier blocks are skipped; ``run_end`` when the run holds no
    such key); blocks before ``band_end`` hold a key below ``lowest_full_key``, hidden from
    some row, and need the window mask."""
    first = run_start + (tl.maximum(lowest_key - run_start, 0) // BLOCK_N) * BLOCK_N
    first = tl.where(lowest_key < run_end, first, run_end)
    band_end = run_start + ((tl.maximum(lowest_full_key - run_start, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    return first, band_end
