"""Triton backend of the per-chunk steps (Liger-Kernel style: the matmuls stay in cuBLAS).

One program per row of a logits chunk ``[c, V]`` walks the vocabulary in ``BLOCK_V`` tiles:
- ``log_prob_stats_kernel``: online log-sum-exp, target gather and entropy in one read of
  the row. The entropy is carried as ``sum_j e_j (z_j - m)`` with ``e_j = exp(z_j - m)``
  (every term <= 0, rescaled when the running max ``m`` moves), so
  ``H = log s - (sum_j e_j (z_j - m)) / s`` has no cancellation even for a peaked row.
- ``log_prob_grad_kernel``: recomputes ``p`` from the stored ``lse`` and overwrites a row of
  a block of vocabulary columns with the gradient of the logits (one read, one write).
Both scale the logits by the inverse temperature, after a final-logit softcap
``softcap * tanh(x / softcap)`` when one is given (Gemma 2), as :func:`scaled_logits` does.
Logits stay in the input dtype in memory (bf16/fp16 chunks are half the bytes of float32
ones and need no upcast pass); the kernels compute in the dtype of the ``[c]`` statistics,
float32 (float64 for float64 inputs), and write the gradient back in the logits' dtype,
which is what the head's backward matmuls consume.
Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
# No `from __future__ import annotations`: Triton reads the ``tl.float64`` annotations of
# ``scale`` and ``inv_softcap`` as objects (a string would be ignored and the scalar passed as fp32,
# whose rounding shows in float64 results).
import torch
import triton
import triton.language as tl

from ..runtime import device_guard
from ..triton_math import tanh

__all__ = ["chunk_grad_logits_triton_", "chunk_stats_triton", "log_prob_grad_kernel", "log_prob_stats_kernel",
           "scaled_logits"]

# Largest vocabulary tile per loop step: 8192 fp32 lanes over 8 warps is 32 registers a thread.
MAX_BLOCK_V = 8192


@triton.jit
def scaled_logits(x, scale, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    """``(z, t)``: ``z = x * scale``, or with HAS_SOFTCAP ``z = t * scale``, ``t =
    tanh(x * inv_softcap)`` (``scale`` then carries the softcap; ``t`` is ``x`` without)."""
    if HAS_SOFTCAP:
        capped = tanh(x * inv_softcap)
        return capped * scale, capped
    else:
        return x * scale, x

@triton.jit
def log_prob_stats_kernel(logits_ptr, row_stride, targets_ptr, log_probs_ptr, lse_ptr, entropy_ptr,
                          vocab_size, scale: tl.float64, inv_softcap: tl.float64,
                          HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """``log_probs``, ``lse`` and ``entropy`` ``[c]`` of the scaled ``logits [c, V]``
    (:func:`scaled_logits`)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    dtype = lse_ptr.dtype.element_ty
    z_scale = tl.full([], scale, dtype)
    cap_inv = tl.full([], inv_softcap, dtype)
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([], float("-inf"), dtype)
    sum_exp = tl.zeros([], dtype)
    sum_exp_shift = tl.zeros([], dtype)  # sum_j e_j (z_j - running_max), <= 0
    for start in range(0, vocab_size, BLOCK_V):
        inside = start + cols < vocab_size
        z, _ = scaled_logits(tl.load(row_ptr + start + cols, mask=inside, other=0.0).to(dtype), z_scale,
                             cap_inv, HAS_SOFTCAP)
        z = tl.where(inside, z, float("-inf"))  # padding lanes add nothing (a capped -inf would)
        new_max = tl.maximum(running_max, tl.max(z, 0))
        # Before the first finite logit running_max is -inf and there is nothing to rescale.
        shift = tl.where(sum_exp > 0, running_max - new_max, 0.0).to(dtype)
        rescale = tl.exp(shift)
        sum_exp_shift = rescale * (sum_exp_shift + shift * sum_exp)
        # -inf logits (padding lanes, banned tokens) add 0; the where also hides -inf - -inf.
        e = tl.where(z > float("-inf"), tl.exp(z - new_max), 0.0).to(dtype)
        sum_exp = rescale * sum_exp + tl.sum(e, 0)
        sum_exp_shift += tl.sum(tl.where(e > 0, z - new_max, 0.0).to(dtype) * e, 0)
        running_max = new_max
    log_sum = tl.log(sum_exp)
    lse = running_max + log_sum
    target = tl.load(targets_ptr + row)
    target_logit, _ = scaled_logits(tl.load(row_ptr + target).to(dtype), z_scale, cap_inv, HAS_SOFTCAP)
    tl.store(log_probs_ptr + row, target_logit - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, log_sum - sum_exp_shift / sum_exp)

@triton.jit
def log_prob_grad_kernel(logits_ptr, row_stride, targets_ptr, vocab_start, lse_ptr, entropy_ptr,
                         grad_log_probs_ptr, grad_entropy_ptr, vocab_size, scale: tl.float64,
                         inv_softcap: tl.float64, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    """Overwrite ``logits [c, vocab_size]``, the vocabulary's columns from ``vocab_start`` on,
    with ``d(g_lp log p_t + g_H H) / d logits``, row by row (``g_H = 0`` without
    HAS_GRAD_ENTROPY; ``entropy_ptr``, ``grad_entropy_ptr`` unread then). The chain from the
    scaled logits ``z`` is ``scale``, times ``(1 - t^2) * inv_softcap`` with HAS_SOFTCAP."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    dtype = lse_ptr.dtype.element_ty
    z_scale = tl.full([], scale, dtype)
    cap_inv = tl.full([], inv_softcap, dtype)
    lse = tl.load(lse_ptr + row)
    grad_log_prob = tl.load(grad_log_probs_ptr + row)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
    target = tl.load(targets_ptr + row) - vocab_start  # a column of this block, or outside it
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab_size, BLOCK_V):
        inside = start + cols < vocab_size
        z, capped = scaled_logits(tl.load(row_ptr + start + cols, mask=inside, other=0.0).to(dtype), z_scale,
                                  cap_inv, HAS_SOFTCAP)
        log_p = z - lse
        p = tl.exp(log_p)
        grad = tl.where(start + cols == target, grad_log_prob, 0.0) - grad_log_prob * p
        if HAS_GRAD_ENTROPY:
            # d H / d z = -p (log p + H); a banned token (p = 0, log p = -inf) adds 0, not NaN.
            grad -= grad_entropy * (tl.where(p > 0, log_p + entropy, 0.0) * p)
        grad *= z_scale
        if HAS_SOFTCAP:
            grad *= (1.0 - capped * capped) * cap_inv
        tl.store(row_ptr + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def _launch_config(vocab_size: int) -> dict:
    block = min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)
    return dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4)


def _scales(inv_temperature: float, softcap: float | None) -> dict:
    """The kernels' ``scale``, ``inv_softcap`` and ``HAS_SOFTCAP`` (:func:`scaled_logits`)."""
    if softcap is None:
        return dict(scale=inv_temperature, inv_softcap=1.0, HAS_SOFTCAP=False)
    return dict(scale=softcap * inv_temperature, inv_softcap=1.0 / softcap, HAS_SOFTCAP=True)


def chunk_stats_triton(logits: torch.Tensor, targets: torch.Tensor, inv_temperature: float, softcap: float | None,
                       log_probs: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor) -> None:
    """Same contract as :func:`..torch_impl.chunk_stats_torch` (``logits`` is left intact here)."""
    rows, vocab_size = logits.shape
    with device_guard(logits):
        log_prob_stats_kernel[(rows,)](logits, logits.stride(0), targets, log_probs, lse, entropy, vocab_size,
                                       **_scales(inv_temperature, softcap), **_launch_config(vocab_size))


def chunk_grad_logits_triton_(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, lse: torch.Tensor,
                              entropy: torch.Tensor, grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor | None,
                              inv_temperature: float, softcap: float | None) -> torch.Tensor:
    """Same contract as :func:`..torch_impl.chunk_grad_logits_torch_`: the gradient, in place."""
    rows, vocab_size = logits.shape
    has_grad_entropy = grad_entropy is not None
    with device_guard(logits):
        log_prob_grad_kernel[(rows,)](logits, logits.stride(0), targets, vocab_start, lse, entropy, grad_log_probs,
                                      grad_entropy if has_grad_entropy else grad_log_probs, vocab_size,
                                      **_scales(inv_temperature, softcap), HAS_GRAD_ENTROPY=has_grad_entropy,
                                      **_launch_config(vocab_size))
    return logits
