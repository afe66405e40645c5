"""Math helpers for the Triton kernels of more than one op (attention's softcap, the fused
head's final-logit softcap). Imports triton: only kernel modules import it."""
from __future__ import annotations

import triton
import triton.language as tl

MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)
# tanh(x) / x = 1 + sum_k T_k x^(2k), k = 1..8: the Taylor coefficients 2^(2k+2) (2^(2k+2) - 1)
# B_(2k+2) / (2k+2)! (Bernoulli numbers B). Below |x| = 0.5 the first omitted term is under
# 1e-9 of tanh(x) (float32 rounding: 6e-8); below 0.2, under 1e-16 (float64 rounding).
T1 = tl.constexpr(-1 / 3)
T2 = tl.constexpr(2 / 15)
T3 = tl.constexpr(-17 / 315)
T4 = tl.constexpr(62 / 2835)
T5 = tl.constexpr(-1382 / 155925)
T6 = tl.constexpr(21844 / 6081075)
T7 = tl.constexpr(-929569 / 638512875)
T8 = tl.constexpr(6404582 / 10854718875)


@triton.jit
def tanh(x):
    """``tanh(x)`` to the rounding of x's dtype (a few ulp), for every ``x``.

    Not every Triton release has ``tl.tanh``. From ``exp2``, with ``e = exp(-2|x|)`` in
    ``(0, 1]``, ``(1 - e) / (1 + e)`` never overflows and reaches +-1 for large ``|x|``, but
    ``1 - e`` cancels near 0: its absolute error ~1e-7 (float32) is all of tanh(1e-7). A
    softcap divides scores by the cap before the tanh, so a cap of 1e6 puts every score
    there. Near 0 the odd Taylor series (exact to rounding there) takes over; where the
    formula takes over, ``1 - e >= 0.63`` (float32) keeps its error at about an ulp.
    """
    magnitude = tl.abs(x)
    if x.dtype == tl.float64:
        series_below = 0.2
    else:
        series_below = 0.5
    e = tl.exp2(magnitude * MINUS_2_LOG2E)
    formula = (1.0 - e) / (1.0 + e)
    # The series on |x| clamped to its range: where the formula is taken, it is not needed
    # (and x * x could overflow).
    near_zero = tl.minimum(magnitude, series_below)
    s = near_zero * near_zero
    series = near_zero + near_zero * s * (T1 + s * (T2 + s * (T3 + s * (T4 + s * (T5 + s * (T6 + s * (T7 + s * T8)))))))
    result = tl.where(magnitude < series_below, series, formula)
    return tl.where(x < 0, -result, result)
