"""``prefix_attention``: validation and backend dispatch."""
from __future__ import annotations

import math

import torch

from .. import _dispatch as registry
from .._dispatch import Backend, register_op
from ..checks import check_bool, check_int, check_positive_real
from ..layout import GroupLayout
from ..runtime import triton_unavailable_reason
from .flash_backend import flash_preferred, flash_prefix_attention
from .flash_engines import engine_unavailable_reason
from .reference import reference_prefix_attention
from .torch_backend import torch_prefix_attention

__all__ = ["BACKENDS", "MAX_HEAD_DIM", "available_backends", "prefix_attention", "resolve_backend"]

OP = "prefix_attention"
BACKENDS = ("reference", "torch", "triton", "flash")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

# The Triton kernels scale scores by softmax_scale * log2(e) held in float32, and the
# torch backend computes half inputs in float32: both must be finite and nonzero there.
_FLOAT32 = torch.finfo(torch.float32)
_SCALE_RANGE = (_FLOAT32.tiny, _FLOAT32.max / math.log2(math.e))


def _triton_unavailable(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if dtype == torch.float64:
        return "the Triton kernels support float16, bfloat16 and float32, not float64"
    reason = triton_unavailable_reason(device)
    if reason is None and device.type == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter (3.8) computes bf16 tl.dot wrongly; refuse rather than mislead.
        return "on CPU (the Triton interpreter) it supports float32 and float16, not bfloat16"
    return reason


def _reference(q, k, v, layout, softmax_scale, *, window, softcap, sinks, need_lse):
    return reference_prefix_attention(q, k, v, layout, softmax_scale, window=window, softcap=softcap, sinks=sinks)


def _triton(q, k, v, layout, softmax_scale, *, window, softcap, sinks, need_lse):
    from .triton_backend import triton_prefix_attention  # imports triton: only when it runs

    return triton_prefix_attention(q, k, v, layout, softmax_scale, window=window, softcap=softcap, sinks=sinks)


# Every implementation takes (q, k, v, layout, softmax_scale, *, window, softcap, sinks,
# need_lse) on validated token-first inputs and returns (out, lse or None).
register_op(OP, [
    Backend("reference", _reference),
    Backend("torch", torch_prefix_attention),
    Backend("triton", _triton, unavailable=_triton_unavailable, auto_devices=frozenset({"cuda"})),
    # "auto" picks flash only where a committed GPU run measured it faster (flash_preferred).
    Backend("flash", flash_prefix_attention, unavailable=engine_unavailable_reason, auto_devices=frozenset({"cuda"})),
], auto_order=("triton", "torch"))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest last."""
    return registry.available_backends(OP, device)


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend ``prefix_attention`` runs for ``backend`` on ``device`` inputs of ``dtype``.

    ``"auto"`` is ``"triton"`` on CUDA (not for float64) when Triton is available, else
    ``"torch"`` (``prefix_attention`` also picks ``"flash"`` for a call where
    :data:`~prefix_grouper.attention.flash_backend.FLASH_MEASURED_FASTER` says it measured
    faster); an explicit name is returned as is, or refused with the reason it cannot run
    (:class:`~prefix_grouper._dispatch.BackendUnavailableError`).
    """
    return registry.resolve_backend(OP, backend, device, dtype)


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


def _check_softcap(value) -> float:
    """``value`` as a cap that is finite and nonzero in float32, where the kernels divide by it."""
    cap = check_positive_real(value, "softcap")
    if not _FLOAT32.tiny <= cap <= _FLOAT32.max:
        raise ValueError(f"softcap must be in [{_FLOAT32.tiny:.4g}, {_FLOAT32.max:.4g}] (finite and nonzero in "
                         f"float32, where the kernels divide scores by it); got {cap!r}")
    return cap


def _check_sinks(sinks, q: torch.Tensor) -> None:
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape [Hq] = [{q.shape[1]}] or None, "
                        f"got {type(sinks).__name__}")
    if not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must have a floating-point dtype, got {sinks.dtype}")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must have shape [Hq] = [{q.shape[1]}] (one logit per query head), "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}; move sinks to q's device")


_LAYOUTS = ("token-first [T, heads, head_dim] or [1, T, heads, head_dim] (T = layout.total_tokens); "
            "transformers' head-first [1, heads, T, head_dim] must be transposed first: x.transpose(1, 2)")


def _check_token_first(name: str, x: torch.Tensor, total_tokens: int, batched: bool) -> None:
    """``x`` (the leading batch dim of 4-D inputs already dropped) must be ``[T, heads, head_dim]``."""
    given = tuple(x.shape) if not batched else (1, *x.shape)
    if x.dim() != 3:
        raise ValueError(f"{name} must be {_LAYOUTS}; got {name} of shape {given}")
    if x.shape[0] != total_tokens:
        head_first = x.shape[1] == total_tokens
        hint = (f"it looks head-first ({'[1, heads, T, head_dim]' if batched else '[heads, T, head_dim]'}); "
                if head_first else "")
        raise ValueError(f"{name} has {x.shape[0]} tokens but the layout packs T={total_tokens}: {hint}"
                         f"expected {_LAYOUTS}; got {name} of shape {given}")


def _validate(q, k, v, layout, batched: bool):
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"layout must be a GroupLayout, got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _check_token_first(name, x, layout.total_tokens, batched)
        if x.shape[1] == 0:
            raise ValueError(f"{name} must have at least one head, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
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
    *,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Softmax attention under the shared-prefix mask of a packed batch: a prefix tree.

    Query token q sees key token k iff k's segment is q's or one of its ancestors and
    ``pos(k) <= pos(q)`` (``pos`` = ``layout.position_ids``, the position within the
    unpacked sequence). On a one-level layout (a GRPO batch: the depth-1 tree) q sees its
    group's prompt and causally its own completion; on ``GroupLayout.from_sequences``, its
    sequence's earlier tokens. Outputs (and gradients of any loss on them) equal those of
    running every sequence (``[prefix; completion]``) separately, window, softcap and sinks
    included.

    Args:
        q: ``[T, Hq, D]`` or ``[1, T, Hq, D]`` (token-first), T = ``layout.total_tokens``,
            ``Hq >= 1``. transformers' attention functions receive head-first
            ``[1, Hq, T, D]``: pass ``query.transpose(1, 2)``.
        k, v: ``[T, Hkv, D]`` or ``[1, T, Hkv, D]`` (the same form as q), ``Hkv >= 1``,
            ``Hq % Hkv == 0`` (GQA/MQA); ``1 <= D <= 256``. q, k, v share one dtype and
            device: float16, bfloat16 or float32 on every backend, float64 on the
            ``reference`` and ``torch`` backends only (``"auto"`` picks torch for it).
            Any strides.
        layout: the batch's :class:`GroupLayout`, on q's device.
        softmax_scale: multiplier of ``q . k``, default ``1 / sqrt(D)``; a positive real
            whose float32 ``softmax_scale * log2(e)`` is finite and nonzero.
        window: sliding window, an int ``>= 1``: k is visible from q only when also
            ``pos(q) - window < pos(k)`` (transformers' ``sliding_window``; a completion's
            first tokens see the end of their prompt). None, or a window at least the
            longest row, masks nothing more.
        softcap: a positive real: scores ``s = softmax_scale * q . k`` become
            ``softcap * tanh(s / softcap)`` before the softmax (Gemma 2's
            ``attn_logit_softcapping``).
        sinks: ``[Hq]`` float tensor on q's device, differentiable: one logit per query
            head that joins every row's softmax denominator and has no value (gpt-oss's
            ``sinks``); it is neither scaled nor capped.
        backend: ``"auto"`` (triton on CUDA when available, else torch), ``"torch"``,
            ``"triton"``, ``"flash"`` (varlen FlashAttention-class CUDA kernels composed and
            merged by LSE, float16/bfloat16 on CUDA; on any device and dtype inside
            ``flash_engine("reference")``; see :mod:`prefix_grouper.attention.flash_backend`),
            or ``"reference"`` (dense fp32/fp64 ground truth, slow); see :func:`resolve_backend`.
        return_lse: also return the log-sum-exp of the (capped) scores the row sees, the
            sink included.

    Returns:
        out ``[T, Hq, D]`` (``[1, T, Hq, D]`` for 4-D inputs) in q's dtype and, when
        ``return_lse``, lse ``[T, Hq]`` (``[1, T, Hq]``) float32 (float64 for float64
        inputs), differentiable too.

    NaN/inf in K or V stay contained on every backend: those of a token reach only the
    rows of its segment's subtree (and the gradients of the keys those rows see): a
    completion token's only that completion's rows, a prefix token's only its group's
    rows. Every other row's output and q/k/v gradients are those of a clean batch, with
    any window, softcap or sinks. The gradient of ``sinks`` sums over every row, so a
    poisoned row reaches it.
    """
    check_bool(return_lse, "return_lse")
    batched = isinstance(q, torch.Tensor) and q.dim() == 4
    if batched:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"q is 4-D, so {name} must be [1, T, heads, head_dim] too ({_LAYOUTS}); "
                                 f"got {name} of shape {shape}")
        q, k, v = q[0], k[0], v[0]
    _validate(q, k, v, layout, batched)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        softmax_scale = _check_softmax_scale(softmax_scale)
    if window is not None:
        window = check_int(window, "window", 1)
    if softcap is not None:
        softcap = _check_softcap(softcap)
    if sinks is not None:
        _check_sinks(sinks, q)
    features = {"window": window, "softcap": softcap, "sinks": sinks}
    name = resolve_backend(backend, q.device, q.dtype)
    if backend == "auto" and flash_preferred(q.device, q.dtype, q.shape[-1], layout, softcap):
        name = "flash"
    out, lse = registry.implementation(OP, name)(q, k, v, layout, softmax_scale, **features, need_lse=return_lse)
    if batched:
        out = out[None]
        lse = None if lse is None else lse[None]
    return (out, lse) if return_lse else out
