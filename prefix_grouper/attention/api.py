"""``prefix_attention``: validation and backend dispatch."""
from __future__ import annotations

import math

import torch

from ..checks import check_bool, check_choice, check_positive_real
from ..layout import GroupLayout
from ..runtime import require_triton, triton_on_cuda, triton_unavailable_reason
from .reference import reference_prefix_attention
from .torch_backend import torch_prefix_attention

__all__ = ["BACKENDS", "MAX_HEAD_DIM", "available_backends", "prefix_attention", "resolve_backend"]

BACKENDS = ("reference", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

# The Triton kernels scale scores by softmax_scale * log2(e) held in float32, and the
# torch backend computes half inputs in float32: both must be finite and nonzero there.
_FLOAT32 = torch.finfo(torch.float32)
_SCALE_RANGE = (_FLOAT32.tiny, _FLOAT32.max / math.log2(math.e))

def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest last."""
    device = torch.device(device)
    names = ["reference", "torch"]
    if triton_unavailable_reason(device) is None:
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend ``prefix_attention`` runs for ``backend`` on ``device`` inputs of ``dtype``.

    ``"auto"`` is ``"triton"`` on CUDA (not for float64) when Triton is available, else
    ``"torch"``; an explicit name is returned as is, or refused with the reason it cannot run.
    """
    check_choice(backend, "backend", ("auto",) + BACKENDS)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if dtype != torch.float64 and triton_on_cuda(device) else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32, got float64")
        require_triton(device)
        if device.type == "cpu" and dtype == torch.bfloat16:
            # Triton's interpreter (3.8) computes bf16 tl.dot wrongly; refuse rather than mislead.
            raise TypeError("backend='triton' on CPU (the Triton interpreter) supports float32 and float16, "
                            "not bfloat16")
    return backend


def _check_softmax_scale(value) -> float:
    """``value`` as a scale whose float32 ``value * log2(e)`` is finite and nonzero.

    Whether ``scale * max |q . k|`` overflows is data-dependent and unchecked (it would
    need a device sync); a scale that is itself out of float32 range always is wrong.
    """
    scale = check_positive_real(value, "softmax_scale")
    low, high = _SCALE_RANGE
    if not low <= scale <= high:
        raise ValueError(f"softmax_scale must be in [{low:.4g}, {high:.4g}] so that softmax_scale * log2(e), "
                         f"the kernels' float32 score multiplier, is finite and nonzero; got {scale!r}")
    return scale


def _validate(q, k, v, layout):
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name} must have shape [T, heads, head_dim] (or [1, T, heads, head_dim]), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{name} must have at least one head, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.shape[0] != layout.total_tokens:
            raise ValueError(
                f"{name} has {x.shape[0]} tokens but the layout packs T={layout.total_tokens}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if layout.device != q.device:
        raise ValueError(
            f"layout is on {layout.device} but q is on {q.device}; build the layout with "
            f"device=q.device or call layout.to(q.device) once per batch"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    if k.shape[2] != d:
        raise ValueError(f"k and v head_dim {k.shape[2]} must equal q head_dim {d}")
    if hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA/MQA)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: GroupLayout,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Softmax attention under the shared-prefix mask of a packed GRPO batch.

    Query token q sees key token k iff both are in the same group, ``pos(k) <= pos(q)``,
    and k is a prefix token or in q's own completion. Completion outputs (and gradients of
    any loss on them) equal those of running every ``[prefix; completion]`` separately.

    Args:
        q: ``[T, Hq, D]`` or ``[1, T, Hq, D]``, T = ``layout.total_tokens``, ``Hq >= 1``.
        k, v: ``[T, Hkv, D]`` or ``[1, T, Hkv, D]`` (the same form as q), ``Hkv >= 1``,
            ``Hq % Hkv == 0`` (GQA/MQA); ``1 <= D <= 256``. q, k, v share one dtype and
            device: float16, bfloat16 or float32 on every backend, float64 on the
            ``reference`` and ``torch`` backends only (``"auto"`` picks torch for it).
            Any strides.
        layout: the batch's :class:`GroupLayout`, on q's device.
        softmax_scale: multiplier of ``q . k``, default ``1 / sqrt(D)``; a positive real
            whose float32 ``softmax_scale * log2(e)`` is finite and nonzero.
        backend: ``"auto"`` (triton on CUDA when available, else torch), ``"torch"``,
            ``"triton"``, or ``"reference"`` (dense fp32/fp64 ground truth, slow); see
            :func:`resolve_backend`.
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out ``[T, Hq, D]`` (``[1, T, Hq, D]`` for 4-D inputs) in q's dtype and, when
        ``return_lse``, lse ``[T, Hq]`` (``[1, T, Hq]``) float32 (float64 for float64
        inputs), differentiable too.

    NaN/inf in K or V stay contained on every backend: those of a completion token reach
    only that completion's rows (and the gradients of the keys those rows see), those of a
    prefix token only its group's rows. Every other row's output and gradients are those
    of a clean batch.
    """
    check_bool(return_lse, "return_lse")
    batched = isinstance(q, torch.Tensor) and q.dim() == 4
    if batched:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"with a leading batch dim, {name} must be [1, T, heads, head_dim], got {shape}"
                )
        q, k, v = q[0], k[0], v[0]
    _validate(q, k, v, layout)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        softmax_scale = _check_softmax_scale(softmax_scale)
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "reference":
        out, lse = reference_prefix_attention(q, k, v, layout, softmax_scale)
    elif name == "torch":
        out, lse = torch_prefix_attention(q, k, v, layout, softmax_scale, need_lse=return_lse)
    else:
        from .triton_backend import triton_prefix_attention

        out, lse = triton_prefix_attention(q, k, v, layout, softmax_scale)
    if batched:
        out = out[None]
        lse = None if lse is None else lse[None]
    return (out, lse) if return_lse else out
