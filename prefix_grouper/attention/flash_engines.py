"""Varlen attention engines behind ``backend="flash"``: one calling contract, three engines.

The contract is FlashAttention-2's varlen one. Packed ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]``
(``Hq % Hkv == 0``, last dim contiguous); entry ``b`` of the batch is queries
``q[cu_seq_q[b]:cu_seq_q[b+1]]`` against keys ``k[cu_seq_k[b]:cu_seq_k[b] + n_b]`` with
``n_b = seqused_k[b]`` when given (forward only, as in FlashAttention), else
``cu_seq_k[b+1] - cu_seq_k[b]``. ``cu_seq_*`` are int32 ``[B+1]`` on q's device, non-decreasing;
``max_q``/``max_k`` bound the entries' lengths (host ints: no device sync).

Masks are **bottom-right aligned**: query ``i`` of an ``Lq x Lk`` entry sits at key index
``a_i = i + Lk - Lq``; ``causal`` keeps keys ``j <= a_i``; ``window_left = w >= 0`` keeps
``j >= a_i - w`` and ``window_right = w >= 0`` keeps ``j <= a_i + w`` (``-1``: unbounded;
``causal`` implies ``window_right = 0``). ``softcap > 0`` turns scaled scores ``s`` into
``softcap * tanh(s / softcap)``.

``forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal, window_left,
window_right, softcap, seqused_k=None) -> (out [Tq, Hq, D] in q.dtype, lse [Hq, Tq] float32)``:
``lse`` is the **natural** log-sum-exp of the row's scaled (capped) scores. A row that sees no
key gets ``out = 0`` and ``lse = +inf`` (FlashAttention's convention); rows outside every
entry are unspecified.

``backward(grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal,
window_left, window_right, softcap) -> (dq, dk, dv)`` in the inputs' dtypes: the gradient of
attention whose output and LSE are ``out`` and ``lse`` (``lse [Hq, Tq]``, contiguous). With
``P = exp(S - lse)`` and ``delta = rowsum(grad_out * out)`` it returns the exact share of
these keys in a merged attention when given the merged ``out``/``lse`` (as ring attention
does). Keys of entries without queries get zero gradients.

Engines (:func:`flash_engine` forces one; ``"auto"``: ``flash_attn`` when installed, else
``torch``, on CUDA (and meta) only):

- ``"torch"``: PyTorch's own FlashAttention-2 (``aten._flash_attention_forward/_backward``),
  float16/bfloat16, sm80+, head_dim a multiple of 8; no softcap. LSE: natural log. Also on
  meta tensors (the ops' meta kernels), for shape propagation.
- ``"flash_attn"``: the ``flash_attn`` package (2.7 or newer, FlashAttention-2 varlen
  functions), float16/bfloat16, head_dim a multiple of 8; softcap. LSE: natural log.
- ``"reference"``: plain PyTorch, one dense product per entry, any device, every float dtype
  (float32 math for half inputs, float64 for float64 and then a float64 ``lse``): the test
  engine that runs the whole composition on CPU. LSE: natural log.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from typing import Callable, NamedTuple, Optional

import torch

from ..checks import check_choice

__all__ = ["ENGINES", "VarlenEngine", "engine_unavailable_reason", "flash_engine", "forced_engine", "select_engine"]

ENGINES = ("auto", "torch", "flash_attn", "reference")
_HALF = (torch.float16, torch.bfloat16)


class VarlenEngine(NamedTuple):
    """One varlen attention implementation of the contract above."""
    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    unavailable: Callable[[torch.device, Optional[torch.dtype]], Optional[str]]
    has_softcap: bool
    needs_head_dim_multiple_of_8: bool


# ---------------------------------------------------------------------------- reference


def _entries(cu_seq_q, cu_seq_k, seqused_k):
    """Host ``(q_start, q_stop, k_start, k_count)`` of every entry (a device read: test engine)."""
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    used = None if seqused_k is None else seqused_k.tolist()
    for b in range(len(cq) - 1):
        count = ck[b + 1] - ck[b] if used is None else used[b]
        yield cq[b], cq[b + 1], ck[b], count


def _visible(lq, lk, causal, window_left, window_right, device):
    """``[Lq, Lk]`` bool: the bottom-right aligned mask of one entry."""
    aligned = torch.arange(lq, device=device)[:, None] + (lk - lq)
    keys = torch.arange(lk, device=device)[None, :]
    visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        window_right = 0
    if window_right >= 0:
        visible &= keys <= aligned + window_right
    if window_left >= 0:
        visible &= keys >= aligned - window_left
    return visible


def _entry_scores(q, k, scale, softcap, visible):
    """Scaled, capped, masked scores ``[Hq, Lq, Lk]`` and ``d capped / d scaled`` (or None)."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, dim=1)) * scale
    derivative = None
    if softcap:
        tanh = torch.tanh(scores / softcap)
        derivative = 1 - tanh.square()
        scores = softcap * tanh
    return scores.masked_fill(~visible, float("-inf")), derivative


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reference_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal, window_left=-1,
                       window_right=-1, softcap=0.0, seqused_k=None):
    compute = _compute_dtype(q)
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=compute, device=q.device)
    for q0, q1, k0, count in _entries(cu_seq_q, cu_seq_k, seqused_k):
        if q1 == q0 or count == 0:
            continue
        visible = _visible(q1 - q0, count, causal, window_left, window_right, q.device)
        scores, _ = _entry_scores(qf[q0:q1], kf[k0:k0 + count], scale, softcap, visible)
        row_lse = torch.logsumexp(scores, -1)  # -inf where a row sees nothing
        sees = row_lse != float("-inf")
        probs = torch.exp(scores - torch.where(sees, row_lse, 0)[..., None])
        values = vf[k0:k0 + count].repeat_interleave(group, dim=1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, values)
        lse[:, q0:q1] = torch.where(sees, row_lse, float("inf"))
    return out.to(q.dtype), (lse if compute == torch.float64 else lse.float())


def _reference_backward(grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal,
                        window_left=-1, window_right=-1, softcap=0.0):
    compute = _compute_dtype(q)
    qf, kf, vf, gf, of = (x.to(compute) for x in (q, k, v, grad_out, out))
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = (torch.zeros(x.shape, dtype=compute, device=x.device) for x in (q, k, v))
    delta = (gf * of).sum(-1).transpose(0, 1)  # [Hq, Tq]
    for q0, q1, k0, count in _entries(cu_seq_q, cu_seq_k, None):
        if q1 == q0 or count == 0:
            continue
        keys = slice(k0, k0 + count)
        visible = _visible(q1 - q0, count, causal, window_left, window_right, q.device)
        scores, derivative = _entry_scores(qf[q0:q1], kf[keys], scale, softcap, visible)
        probs = torch.exp(scores - lse[:, q0:q1].to(compute)[..., None])  # 0 where masked or lse = +inf
        values = vf[keys].repeat_interleave(group, dim=1)
        grad_probs = torch.einsum("qhd,khd->hqk", gf[q0:q1], values)
        grad_scores = probs * (grad_probs - delta[:, q0:q1, None])
        if derivative is not None:
            grad_scores = grad_scores * derivative
        dq[q0:q1] = torch.einsum("hqk,khd->qhd", grad_scores, kf[keys].repeat_interleave(group, dim=1)) * scale
        # A KV head's gradient sums over its query heads.
        dk_heads = torch.einsum("hqk,qhd->khd", grad_scores, qf[q0:q1]) * scale
        dv_heads = torch.einsum("hqk,qhd->khd", probs, gf[q0:q1])
        dk[keys] += dk_heads.unflatten(1, (k.shape[1], group)).sum(2)
        dv[keys] += dv_heads.unflatten(1, (k.shape[1], group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _reference_unavailable(device, dtype):
    if dtype is not None and not dtype.is_floating_point:
        return f"it takes floating-point inputs, not {dtype}"
    return None


REFERENCE = VarlenEngine("reference", _reference_forward, _reference_backward, _reference_unavailable,
                         has_softcap=True, needs_head_dim_multiple_of_8=False)

# ---------------------------------------------------------------------------- CUDA engines


def _cuda_dtype_reason(device, dtype, engine, meta=False):
    """Why ``engine``'s kernels cannot run there; ``meta``: its ops have meta kernels (shape propagation)."""
    if device.type != "cuda" and not (meta and device.type == "meta"):
        return f"the {engine!r} engine runs CUDA kernels and needs CUDA tensors, got {device}"
    if dtype is not None and dtype not in _HALF:
        return (f"the {engine!r} engine (FlashAttention kernels) takes float16 and bfloat16, not "
                f"{str(dtype).replace('torch.', '')}; backends 'triton' (float16/bfloat16/float32) and "
                f"'torch'/'reference' (every float dtype) take it")
    if device.type == "meta":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"the FlashAttention kernels need compute capability 8.0 or newer, got {torch.cuda.get_device_capability(device)}"
    return None


def _torch_unavailable(device, dtype):
    if not hasattr(torch.ops.aten, "_flash_attention_forward") or not torch.backends.cuda.is_flash_attention_available():
        return f"torch {torch.__version__} was built without its FlashAttention-2 kernels"
    return _cuda_dtype_reason(device, dtype, "torch", meta=True)


def _torch_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal, window_left=-1, window_right=-1,
                   softcap=0.0, seqused_k=None):
    if softcap:
        raise ValueError("the 'torch' flash engine (PyTorch's FlashAttention-2) has no softcap")
    extra = {} if seqused_k is None else {"seqused_k": seqused_k}
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, causal, False, scale=scale,
        window_size_left=window_left, window_size_right=window_right, **extra)
    return out, lse  # lse [Hq, Tq], natural log


def _torch_backward(grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal,
                    window_left=-1, window_right=-1, softcap=0.0):
    if softcap:
        raise ValueError("the 'torch' flash engine (PyTorch's FlashAttention-2) has no softcap")
    # No dropout: the RNG state is never read.
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, causal, rng_state, unused,
        scale=scale, window_size_left=window_left, window_size_right=window_right)


TORCH = VarlenEngine("torch", _torch_forward, _torch_backward, _torch_unavailable, has_softcap=False,
                     needs_head_dim_multiple_of_8=True)


@functools.lru_cache(maxsize=None)
def _flash_attn_interface():
    """``(module, None)`` for flash_attn >= 2.7 (its varlen forward/backward take separate window
    sizes and a softcap), else ``(None, reason)``."""
    try:
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError as exc:
        return None, f"the flash_attn package is not installed ({exc})"
    version = tuple(int(part) for part in package.__version__.split(".")[:2] if part.isdigit())
    if version < (2, 7) or not hasattr(interface, "_wrapped_flash_attn_varlen_backward"):
        return None, f"flash_attn {package.__version__} is older than 2.7"
    return interface, None


def _flash_attn_unavailable(device, dtype):
    interface, reason = _flash_attn_interface()
    return reason if interface is None else _cuda_dtype_reason(device, dtype, "flash_attn")


def _flash_attn_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal, window_left=-1,
                        window_right=-1, softcap=0.0, seqused_k=None):
    interface, _ = _flash_attn_interface()
    out, lse, _, _ = interface._wrapped_flash_attn_varlen_forward(
        q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, scale, causal, window_left, window_right, softcap,
        None, False, None, None, seqused_k)
    return out, lse  # lse [Hq, Tq], natural log


def _flash_attn_backward(grad_out, q, k, v, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal,
                         window_left=-1, window_right=-1, softcap=0.0):
    interface, _ = _flash_attn_interface()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    interface._wrapped_flash_attn_varlen_backward(
        grad_out, q, k, v, out, lse, dq, dk, dv, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, scale, causal,
        window_left, window_right, softcap, None, torch.are_deterministic_algorithms_enabled(), None)
    return dq, dk, dv


FLASH_ATTN = VarlenEngine("flash_attn", _flash_attn_forward, _flash_attn_backward, _flash_attn_unavailable,
                          has_softcap=True, needs_head_dim_multiple_of_8=True)

_BY_NAME = {engine.name: engine for engine in (TORCH, FLASH_ATTN, REFERENCE)}

# ---------------------------------------------------------------------------- selection

_FORCED: contextvars.ContextVar[str] = contextvars.ContextVar("prefix_grouper_flash_engine", default="auto")


@contextlib.contextmanager
def flash_engine(name: str):
    """Run ``backend="flash"`` on engine ``name`` inside the block: ``"auto"``, ``"torch"``,
    ``"flash_attn"`` or ``"reference"`` (plain PyTorch on any device, CPU included: a test
    engine). Nested blocks restore the outer engine on exit; thread- and task-local."""
    check_choice(name, "name", ENGINES)
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_engine() -> str:
    """The engine name :func:`flash_engine` set for this context (``"auto"`` outside one)."""
    return _FORCED.get()


def engine_unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None when the current engine (forced, or ``"auto"``'s pick) runs on ``device``/``dtype``."""
    name = forced_engine()
    if name != "auto":
        return _BY_NAME[name].unavailable(device, dtype)
    if device.type not in ("cuda", "meta"):
        return (f"it runs FlashAttention-class CUDA kernels and needs CUDA tensors, got {device} "
                f"(the composition runs on CPU only inside prefix_grouper.attention.flash_engine('reference'))")
    reasons = [engine.unavailable(device, dtype) for engine in (FLASH_ATTN, TORCH)]
    return None if None in reasons else reasons[-1]


def select_engine(device: torch.device, dtype: torch.dtype) -> VarlenEngine:
    """The engine ``backend="flash"`` runs: the forced one, else ``flash_attn`` when it runs there,
    else PyTorch's built-in kernels (resolve availability first: this does not re-check)."""
    name = forced_engine()
    if name != "auto":
        return _BY_NAME[name]
    return FLASH_ATTN if FLASH_ATTN.unavailable(device, dtype) is None else TORCH
