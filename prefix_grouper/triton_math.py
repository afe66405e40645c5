"""Math helpers for the Triton kernels of more than one op (attention's softcap, the fused
head's final-logit softcap). Imports triton: only kernel modules import it."""
from __future__ import annotations

import triton
import triton.language as tl

MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)


@triton.jit
def tanh(x):
    """``tanh(x)`` from ``exp2`` (not every Triton release has ``tl.tanh``): with
    ``e = exp(-2|x|)`` in ``(0, 1]``, ``(1 - e) / (1 + e)`` never overflows, reaches +-1 for
    large ``|x|``, and loses only absolute accuracy ``~1e-7`` near 0 (fp32)."""
    e = tl.exp2(tl.abs(x) * MINUS_2_LOG2E)
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -magnitude, magnitude)
