"""``prefix_attention``: validation and backend dispatch."""
from __future__ import annotations

import math
import numbers

import torch

from ..layout import GroupLayout
from .naive import reference_prefix_attention
from .torch_backend import torch_prefix_attention

BACKENDS = ("reference", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _triton_unavailable_reason(device: torch.device) -> str | None:
    try:
        from .triton_backend import triton_unavailable_reason
    except ImportError as exc:
        return f"triton cannot be imported ({exc})"
    return triton_unavailable_reason(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest last."""
    device = torch.device(device)
    names = ["reference", "torch"]
    if _triton_unavailable_reason(device) is None:
        names.append("triton")
    return names


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and _triton_unavailable_reason(device) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32, got float64")
        reason = _triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' is not available on {device}: {reason}")
        if device.type == "cpu" and dtype == torch.bfloat16:
            # Triton's interpreter (3.8) computes bf16 tl.dot wrongly; refuse rather than mislead.
            raise TypeError("backend='triton' on CPU (the Triton interpreter) supports float32 and float16, "
                            "not bfloat16")
    return backend


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
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA/MQA)")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def _positive_float(value, name: str) -> float:
    """A positive finite float from a Python/NumPy real or a 0-d tensor (bools refused)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


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
        q: ``[T, Hq, D]`` (or ``[1, T, Hq, D]``), T = ``layout.total_tokens``.
        k, v: ``[T, Hkv, D]`` (or ``[1, T, Hkv, D]``), ``Hq % Hkv == 0``; same dtype
            (float16/bfloat16/float32; float64 on the reference and torch backends) and
            device as q; ``D <= 256``.
        layout: the batch's :class:`GroupLayout`, on q's device.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        backend: ``"auto"`` (triton on CUDA when available, else torch), ``"torch"``,
            ``"triton"``, or ``"reference"`` (dense fp32 ground truth, slow).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        out ``[T, Hq, D]`` in q's dtype (with the leading 1 if q had one) and, when
        ``return_lse``, lse ``[T, Hq]`` float32 (float64 for float64 inputs),
        differentiable too.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
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
        softmax_scale = _positive_float(softmax_scale, "softmax_scale")
    name = _resolve_backend(backend, q.device, q.dtype)
    if name == "reference":
        out, lse = reference_prefix_attention(q, k, v, layout, softmax_scale)
    elif name == "torch":
        out, lse = torch_prefix_attention(q, k, v, layout, softmax_scale, need_lse=return_lse)
    else:
        from .triton_backend import triton_prefix_attention

        out, lse = triton_prefix_attention(q, k, v, layout, softmax_scale)
    if batched:
        out, lse = out[None], lse[None]
    return (out, lse) if return_lse else out
