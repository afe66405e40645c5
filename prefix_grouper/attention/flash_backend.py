"""``backend="flash"``: shared-prefix attention composed from varlen FlashAttention-class calls.

The calls (:mod:`.flash_plan`) run on a varlen engine (:mod:`.flash_engines`: PyTorch's
built-in FlashAttention-2, the ``flash_attn`` package, or the plain-PyTorch reference) and
return partial outputs with their natural-log LSEs; :func:`.flash_merge.merge_partials` (a
fused CUDA kernel, or its PyTorch fallback) merges them in float32, the sinks joining as one
more term with no value.

Backward: every call's engine backward gets the **merged** output and LSE, so its softmax
gradient is its exact share of the merged attention's (no second forward); dQ sums over the
calls, dK/dV of a run over the calls that read it (:func:`.flash_merge.sum_partials`, float32
accumulation). A gradient ``g`` of the returned LSE adds ``g P`` to the score gradients; the
engines compute ``delta = rowsum(dO * out)`` themselves, so that term is one more backward per
call with ``dO = -g e_0``, ``out = e_0`` and zero values: then ``dP = 0`` and ``delta = -g``,
exact with a softcap too.
"""
from __future__ import annotations

import torch

from ..layout import GroupLayout
from .flash_engines import VarlenEngine, select_engine
from .flash_merge import merge_pair_, merge_partials, merge_sinks, sink_gradient, sum_partials
from .flash_plan import VarlenCall, flash_plan

__all__ = ["FLASH_MEASURED_FASTER", "flash_preferred", "flash_prefix_attention", "flash_refusal"]

FLASH_MEASURED_FASTER: dict[tuple[str, int, str], str] = {}
"""``(GPU architecture "sm_90", head_dim, shape class)`` -> the committed CSV under
``benchmarks/results/`` in which ``flash`` measured faster than ``triton`` (fwd+bwd, bf16);
``backend="auto"`` picks flash there. Shape classes: :func:`shape_class`. Empty until a GPU
run measures both."""


def shape_class(layout: GroupLayout) -> str:
    """``"one-level"`` for a GRPO batch (every segment a root or a root's child), else ``"tree"``."""
    segments = layout.segmentation.segments
    return "one-level" if all(p < 0 or segments[p].parent < 0 for _, _, p in segments) else "tree"


def flash_refusal(engine: VarlenEngine, head_dim: int, softcap: float | None) -> str | None:
    """Why ``engine`` cannot run this call exactly (None: it can)."""
    if softcap is not None and not engine.has_softcap:
        return (f"softcap={softcap} cannot be expressed by the {engine.name!r} flash engine (PyTorch's "
                f"FlashAttention-2 has no softcap); use backend='triton' or 'torch', or install flash-attn >= 2.7")
    if engine.needs_head_dim_multiple_of_8 and head_dim % 8:
        return (f"head_dim={head_dim} is not a multiple of 8, which the {engine.name!r} flash engine's "
                f"FlashAttention kernels need; use backend='triton' or 'torch'")
    return None


def flash_preferred(device: torch.device, dtype: torch.dtype, head_dim: int, layout: GroupLayout,
                    softcap: float | None) -> bool:
    """Whether ``backend="auto"`` runs flash: measured faster here (:data:`FLASH_MEASURED_FASTER`)
    and able to run the call exactly."""
    if device.type != "cuda" or not FLASH_MEASURED_FASTER:
        return False
    major, minor = torch.cuda.get_device_capability(device)
    if (f"sm_{major}{minor}", head_dim, shape_class(layout)) not in FLASH_MEASURED_FASTER:
        return False
    return flash_refusal(select_engine(device, dtype), head_dim, softcap) is None


def _run_forward(engine, call: VarlenCall, q, k, v, scale, softcap):
    out, lse = engine.forward(q[call.rows], k[call.keys], v[call.keys], call.cu_seq_q, call.cu_seq_k, call.max_q,
                              call.max_k, scale=scale, causal=call.causal, window_left=call.window_left,
                              window_right=call.window_right, softcap=softcap or 0.0)
    if call.empty_rows is not None:
        lse = lse.masked_fill(call.empty_rows, float("-inf"))  # filler rows hold no keys of this call
    return out, lse


def _run_backward(engine, call: VarlenCall, grad_out, q, k, v, out, lse_by_head, scale, softcap):
    rows = call.rows
    row_lse = lse_by_head[:, rows]
    return engine.backward(grad_out[rows], q[rows], k[call.keys], v[call.keys], out[rows], row_lse.contiguous(),
                           call.cu_seq_q, call.cu_seq_k, call.max_q, call.max_k, scale=scale, causal=call.causal,
                           window_left=call.window_left, window_right=call.window_right, softcap=softcap or 0.0)


def _row_start(call: VarlenCall) -> int:
    return call.rows.start


class _FlashPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, engine, scale, softcap):
        total = q.shape[0]
        range_calls = (plan.self_call, *plan.calls)
        parts = [(_row_start(call), *_run_forward(engine, call, q, k, v, scale, softcap)) for call in range_calls]
        if not plan.window_calls:
            out, lse = merge_partials(parts, total, sinks=sinks, out_dtype=q.dtype)
        else:
            # Window calls gather their rows: merge the range calls at full precision, then the
            # gathered ones row by row, then the sinks.
            out, lse = merge_partials(parts, total, out_dtype=torch.float64 if q.dtype == torch.float64
                                      else torch.float32)
            for call in plan.window_calls:
                call_out, call_lse = _run_forward(engine, call, q, k, v, scale, softcap)
                rows = call.rows
                row_out = out[rows]  # a gathered copy, merged then scattered back
                lse[rows] = merge_pair_(row_out, lse[rows], call_out.to(out.dtype), call_lse.t().to(lse.dtype))
                out[rows] = row_out
            if sinks is not None:
                lse = merge_sinks(out, lse, sinks)
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.engine, ctx.scale, ctx.softcap = plan, engine, scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        plan, engine, scale, softcap = ctx.plan, ctx.engine, ctx.scale, ctx.softcap
        total = q.shape[0]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        lse_by_head = lse.t().contiguous()  # the engines' [Hq, T] layout
        runs = [(grad_out, out, v)]
        if grad_lse is not None:
            # dO = -g e_0 against out = e_0 and zero values: the engines' delta becomes -g, dP = 0.
            unit_out = torch.zeros_like(out)
            unit_out[..., 0] = 1
            lse_grad_out = torch.zeros_like(out)
            lse_grad_out[..., 0] = -grad_lse.to(out.dtype)
            runs.append((lse_grad_out, unit_out, torch.zeros_like(v)))
        dq_parts, dk_parts, dv_parts, window_grads = [], [], [], []
        for run, (run_grad_out, run_out, run_v) in enumerate(runs):
            for call in (plan.self_call, *plan.calls):
                dq, dk, dv = _run_backward(engine, call, run_grad_out, q, k, run_v, run_out, lse_by_head, scale,
                                           softcap)
                dq_parts.append((_row_start(call), dq))
                dk_parts.append((call.keys.start, dk))
                if run == 0:  # the LSE run's dv belongs to its zero values
                    dv_parts.append((call.keys.start, dv))
            for call in plan.window_calls:
                window_grads.append((run, call, _run_backward(engine, call, run_grad_out, q, k, run_v, run_out,
                                                              lse_by_head, scale, softcap)))
        accumulate = q.dtype if not window_grads else (torch.float64 if q.dtype == torch.float64 else torch.float32)
        dq = sum_partials(dq_parts, total, dtype=accumulate)
        dk = sum_partials(dk_parts, total, dtype=accumulate)
        dv = sum_partials(dv_parts, total, dtype=accumulate)
        for run, call, (call_dq, call_dk, call_dv) in window_grads:
            dq.index_add_(0, call.rows, call_dq.to(accumulate))
            dk[call.keys] += call_dk.to(accumulate)
            if run == 0:
                dv[call.keys] += call_dv.to(accumulate)
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            grad_sinks = sink_gradient(grad_out, out, lse, grad_lse, sinks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), grad_sinks, None, None, None, None


def flash_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout, softmax_scale: float, *,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared-prefix attention on the selected varlen engine.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``, ``Hq % Hkv == 0``; window, softcap, sinks as in
            :func:`prefix_attention`; validated by the caller (which also resolved the engine's
            availability for q's device and dtype).
        need_lse: also return the LSE (computed either way: the merge needs it).

    Returns ``(out [T, Hq, D] in q.dtype, lse [T, Hq] float32 (float64 for float64 inputs) or None)``.

    Raises ValueError naming the feature when the engine cannot express the call exactly
    (:func:`flash_refusal`).
    """
    engine = select_engine(q.device, q.dtype)
    refusal = flash_refusal(engine, q.shape[-1], softcap)
    if refusal is not None:
        raise ValueError(f"prefix_attention(backend='flash'): {refusal}")
    if window is not None and window >= layout.segmentation.longest_row:
        window = None  # every row already sees all its causal keys
    plan = flash_plan(layout, window)
    # The kernels read the last dim contiguously; other strides are free.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = _FlashPrefixAttention.apply(q, k, v, sinks, plan, engine, softmax_scale, softcap)
    return out, (lse if need_lse else None)
