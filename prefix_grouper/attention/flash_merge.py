"""LSE merge and row sums of partial results over packed rows, for ``backend="flash"`` attention.

Shared-prefix attention is composed of several FlashAttention varlen calls, each giving a partial
output over a range of the packed rows and its log-sum-exp (LSE). :func:`merge_partials` merges
them into the attention over the union of their keys; :func:`sum_partials` adds partial results
(the gradients of the calls) row by row. Both run the fused CUDA ops of csrc/flash_merge.cpp
(``torch.ops.prefix_grouper.merge_attention_partials`` / ``sum_row_partials``) when every tensor
is on CUDA, the extension is built and the dtypes fit; else a PyTorch fallback with the same
contract. Neither is differentiable on the CUDA path (the flash backend has its own backward).

The plain-PyTorch pieces both the flash and the torch backend merge with: one more part into
a result (:func:`merge_pair_`), the sinks (:func:`merge_sinks`) and their gradient
(:func:`sink_gradient`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._extension import cuda_extension_available, require_cuda_extension

__all__ = ["merge_pair_", "merge_partials", "merge_sinks", "sink_gradient", "sum_partials"]

_CUDA_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_SUM_DTYPES = _CUDA_MERGE_DTYPES + (torch.float64,)
_IMPLEMENTATIONS = ("auto", "cuda", "torch")
# An extension built before these ops existed imports but lacks them: it counts as not built.
_OPS_LOADED = cuda_extension_available() and hasattr(torch.ops.prefix_grouper, "merge_attention_partials")

if _OPS_LOADED:
    # Shape-only twins of the ops, so torch.compile and meta tensors can trace through them.
    @torch.library.register_fake("prefix_grouper::merge_attention_partials")
    def _(outs, lses, row_starts, total_rows, sinks, out_dtype):
        heads, dim = outs[0].shape[1:]
        return (outs[0].new_empty((total_rows, heads, dim), dtype=out_dtype),
                outs[0].new_empty((total_rows, heads), dtype=torch.float32))

    @torch.library.register_fake("prefix_grouper::sum_row_partials")
    def _(parts, row_starts, total_rows, dtype):
        return parts[0].new_empty((total_rows, *parts[0].shape[1:]), dtype=dtype)


def merge_partials(parts: Sequence[Tuple[int, torch.Tensor, torch.Tensor]], total_rows: int,
                   sinks: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None, *,
                   implementation: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention outputs by their LSEs.

    ``parts``: ``(row_start, out_c, lse_c)`` per part, ``out_c [R_c, H, D]`` covering packed rows
    ``[row_start, row_start + R_c)`` of the result and ``lse_c [H, R_c]`` its natural-log LSE
    (FlashAttention's varlen layout, any strides). ``sinks``: ``[H]`` attention-sink logits, a
    term with no value. Returns ``out [total_rows, H, D]`` of ``out_dtype`` (default: the dtype of
    the first ``out_c``) and ``lse [total_rows, H]``, float32 (float64 when an input is float64)::

        lse[t, h] = log(sum_c exp(lse_c[h, t - start_c]) + exp(sinks[h]))  # parts covering row t
        out[t, h] = sum_c exp(lse_c[h, t - start_c] - lse[t, h]) * out_c[t - start_c, h]

    A part whose lse is -inf at a row adds nothing there, even if its out holds NaN; a row with
    no term has out 0 and lse -inf. ``implementation``: "auto", "cuda" (raise if the CUDA op
    cannot run) or "torch".
    """
    heads, dim = _check_parts("merge_partials", [(start, out) for start, out, _ in parts], total_rows)
    device = parts[0][1].device
    for index, (_, out, lse) in enumerate(parts):
        if lse.shape != (heads, out.shape[0]) or lse.device != device or not lse.is_floating_point():
            raise ValueError(f"merge_partials: part {index}'s lse must be a floating [H, R] = [{heads}, "
                             f"{out.shape[0]}] tensor on {device}, got {lse.dtype} {tuple(lse.shape)} on {lse.device}")
    if sinks is not None and (sinks.shape != (heads,) or sinks.device != device or not sinks.is_floating_point()):
        raise ValueError(f"merge_partials: sinks must be a floating [H] = [{heads}] tensor on {device}, got "
                         f"{sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
    out_dtype = parts[0][1].dtype if out_dtype is None else out_dtype
    tensors = [t for _, out, lse in parts for t in (out, lse)] + ([] if sinks is None else [sinks])
    part_dtypes = {out.dtype for _, out, _ in parts}
    fits = (len(part_dtypes) == 1 and part_dtypes | {out_dtype} <= set(_CUDA_MERGE_DTYPES)
            and all(lse.dtype == torch.float32 for _, _, lse in parts) and _last_dims_contiguous(parts))
    misfit = None if fits else ("it takes outs of one dtype with a contiguous last dim, out_dtype among "
                                "float16/bfloat16/float32 and float32 lses")
    if _use_cuda("merge_partials", implementation, tensors, misfit):
        return torch.ops.prefix_grouper.merge_attention_partials(
            [out for _, out, _ in parts], [lse for _, _, lse in parts], [start for start, _, _ in parts],
            total_rows, sinks, out_dtype)
    return _merge_torch(parts, total_rows, sinks, out_dtype)


def sum_partials(parts: Sequence[Tuple[int, torch.Tensor]], total_rows: int, dtype: Optional[torch.dtype] = None, *,
                 implementation: str = "auto") -> torch.Tensor:
    """``[total_rows, H, D]`` sum of ``parts``, ``(row_start, x_c)`` with ``x_c [R_c, H, D]`` covering
    rows ``[row_start, row_start + R_c)``; rows no part covers are 0. Added in part order in float32
    (float64 when a part is float64), written in ``dtype`` (default: the dtype of the first part).
    ``implementation``: "auto", "cuda" (raise if the CUDA op cannot run) or "torch"."""
    _check_parts("sum_partials", parts, total_rows)
    dtype = parts[0][1].dtype if dtype is None else dtype
    part_dtypes = {x.dtype for _, x in parts}
    fits = len(part_dtypes) == 1 and part_dtypes | {dtype} <= set(_CUDA_SUM_DTYPES) and _last_dims_contiguous(parts)
    misfit = None if fits else ("it takes parts of one dtype with a contiguous last dim and dtypes among "
                                "float16/bfloat16/float32/float64")
    if _use_cuda("sum_partials", implementation, [x for _, x in parts], misfit):
        return torch.ops.prefix_grouper.sum_row_partials([x for _, x in parts], [start for start, _ in parts],
                                                         total_rows, dtype)
    compute = torch.float64 if any(x.dtype == torch.float64 for _, x in parts) else torch.float32
    total = torch.zeros((total_rows, *parts[0][1].shape[1:]), dtype=compute, device=parts[0][1].device)
    for start, x in parts:
        total[start:start + x.shape[0]] += x.to(compute)
    return total.to(dtype)


def _check_parts(what: str, parts: Sequence[Tuple[int, torch.Tensor]], total_rows: int) -> Tuple[int, int]:
    """``(H, D)`` of ``parts`` (``(row_start, [R_c, H, D])`` on one device), checked to lie within
    ``[0, total_rows)``."""
    if total_rows < 0:
        raise ValueError(f"{what}: total_rows must be >= 0, got {total_rows}")
    if len(parts) == 0:
        raise ValueError(f"{what}: parts is empty; at least one part is needed (it gives H and D)")
    first = parts[0][1]
    if first.dim() != 3:
        raise ValueError(f"{what}: parts must be [R, H, D], part 0 is {tuple(first.shape)}")
    for index, (start, x) in enumerate(parts):
        if x.dim() != 3 or x.shape[1:] != first.shape[1:] or x.device != first.device:
            raise ValueError(f"{what}: part {index} must be [R, H, D] = [R, {first.shape[1]}, {first.shape[2]}] on "
                             f"{first.device} like part 0, got {tuple(x.shape)} on {x.device}")
        if not 0 <= start <= start + x.shape[0] <= total_rows:
            raise ValueError(f"{what}: part {index} covers rows [{start}, {start + x.shape[0]}), outside "
                             f"[0, total_rows = {total_rows})")
    return first.shape[1], first.shape[2]


def _last_dims_contiguous(parts) -> bool:
    """Whether every part's last dim is contiguous, as the CUDA ops read it (other strides are free)."""
    return all(part[1].stride(-1) == 1 or part[1].shape[-1] <= 1 for part in parts)


def _use_cuda(what: str, implementation: str, tensors: Sequence[torch.Tensor], misfit: Optional[str]) -> bool:
    """Whether to run the CUDA op; for implementation="cuda", a RuntimeError saying why it cannot."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"{what}: implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "torch":
        return False
    if implementation == "cuda":
        require_cuda_extension(f"{what}(implementation='cuda')")
    if not _OPS_LOADED:
        misfit = "the built extension prefix_grouper._C predates these ops; rebuild it"
    elif not all(t.is_cuda for t in tensors):
        misfit = "not every tensor is on a CUDA device"
    if misfit is not None and implementation == "cuda":
        raise RuntimeError(f"{what}(implementation='cuda') cannot run: {misfit}")
    return misfit is None


def _merge_torch(parts, total_rows, sinks, out_dtype):
    """The PyTorch fallback of :func:`merge_partials`, in float32 (float64 when an input is)."""
    inputs = [t for _, out, lse in parts for t in (out, lse)] + ([] if sinks is None else [sinks])
    compute = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    first = parts[0][1]
    row_lses = [(slice(start, start + out.shape[0]), out, lse.t().to(compute)) for start, out, lse in parts]
    peak = torch.full((total_rows, first.shape[1]), float("-inf"), dtype=compute, device=first.device)
    for rows, _, lse in row_lses:
        peak[rows] = torch.maximum(peak[rows], lse)
    if sinks is not None:
        peak = torch.maximum(peak, sinks.to(compute))
    shift = peak.masked_fill(peak == float("-inf"), 0)  # rows with no term: exp(-inf - 0) = 0, not NaN
    total = torch.zeros_like(peak) if sinks is None else torch.exp(sinks.to(compute) - shift)
    for rows, _, lse in row_lses:
        total[rows] += torch.exp(lse - shift[rows])
    merged_lse = shift + torch.log(total)  # log(0) = -inf where no term
    out = torch.zeros((*peak.shape, first.shape[2]), dtype=compute, device=first.device)
    for rows, part_out, lse in row_lses:
        weighted = torch.exp(lse - merged_lse[rows])[..., None] * part_out.to(compute)
        out[rows] += torch.where((lse == float("-inf"))[..., None], 0, weighted)  # a select: NaN outs stay out
    return out.to(out_dtype), merged_lse


def merge_pair_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> torch.Tensor:
    """Merge one more part into ``(out, lse)`` of the same rows, any layout with ``out`` of
    one more (head) dim than ``lse``: ``out`` becomes ``out exp(lse - merged) + part_out
    exp(part_lse - merged)`` in place (``part_out`` is overwritten); returns ``merged =
    logaddexp(lse, part_lse)``. The torch backend's cross calls and the flash backend's
    window calls merge this way."""
    merged = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - merged)[..., None])
    out.add_(part_out.mul_(torch.exp(part_lse - merged)[..., None]))
    return merged


def merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention sinks joined to ``(out [T, H, D], lse [T, H])``: a logit per head with no
    value, so ``out`` shrinks by its share in place; returns the merged lse."""
    merged = torch.logaddexp(lse, sinks.to(lse.dtype))
    out *= torch.exp(lse - merged)[..., None].to(out.dtype)
    return merged


def sink_gradient(grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_lse: Optional[torch.Tensor],
                  sinks: torch.Tensor) -> torch.Tensor:
    """The gradient of the sinks ``[H]`` of a merged ``(out [T, H, D], lse [T, H])``, computed in
    lse's dtype: a logit with probability ``p = exp(sink - lse)`` and no value has
    ``d sink = -sum_rows p (rowsum(dO * out) - grad_lse)``."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(lse.dtype)
    return -(torch.exp(sinks.to(lse.dtype) - lse) * delta).sum(0).to(sinks.dtype)
