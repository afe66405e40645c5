"""backend="flash" beyond test_prefix_attention.py's matrix (where it runs on the CPU through
the ``reference`` varlen engine): that engine's own contract against the dense oracle
(unequal lengths, windows left and right, softcap, ``seqused_k``), the plan's calls (views
of the packed K/V, never copies; the depth call's entries and fillers), the engine context,
refusals, and ``auto``'s measured table.

Tolerance 1e-10 in float64: summation order only (~1e-15 relative).
"""
import contextvars

import pytest
import torch
from attention_oracle import masked_attention, random_tree_sequences

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import flash_backend, flash_engine, flash_engines, flash_plan

F64 = torch.float64
TOL = 1e-10


@pytest.fixture
def reference_engine(monkeypatch):
    """``flash_engine("reference")`` for the whole test."""
    monkeypatch.setattr(flash_engines, "_FORCED", contextvars.ContextVar("test_flash_engine", default="reference"))


# ---------------------------------------------------------------------------- the reference engine's contract
def dense_entry(q, k, v, scale, causal, window_left, window_right, softcap):
    """One varlen entry by the contract: query i at key index i + Lk - Lq (bottom-right), keys
    within ``window_left`` before and ``window_right`` after it (-1: unbounded; causal: 0
    after); a query that sees no key has out 0 and lse +inf."""
    lq, lk = q.shape[0], k.shape[0]
    anchor = torch.arange(lq)[:, None] + lk - lq
    key = torch.arange(lk)[None, :]
    right = 0 if causal else window_right
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if right >= 0:
        allowed &= key <= anchor + right
    if window_left >= 0:
        allowed &= key >= anchor - window_left
    out, lse = masked_attention(q, k, v, allowed, scale, softcap=softcap or None)
    return out, torch.where(allowed.any(1)[None, :], lse.transpose(0, 1), float("inf"))


@pytest.mark.parametrize("causal,window_left,window_right", [(True, -1, -1), (False, -1, -1), (True, 2, -1),
                                                             (False, 3, -1), (False, 1, 2), (False, -1, 1)])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_prefix_attention_flash_reference_engine_matches_dense_entries(causal, window_left, window_right, softcap):
    """Entries of unequal lengths (Lq < Lk, Lq > Lk, empty on either side) against :func:`dense_entry`,
    forward and the backward's gradients against autograd of it."""
    g = torch.Generator().manual_seed(0)
    lengths = [(3, 5), (4, 2), (0, 3), (2, 0), (1, 1), (6, 6)]
    cu_q = torch.tensor([0] + [sum(q for q, _ in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(k for _, k in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, 3, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), 2, 3, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), 2, 3, generator=g, dtype=F64, requires_grad=True)
    kwargs = dict(scale=0.7, causal=causal, window_left=window_left, window_right=window_right, softcap=softcap)
    engine = flash_engines.REFERENCE
    with torch.no_grad():
        out, lse = engine.forward(q, k, v, cu_q, cu_k, 6, 6, **kwargs)
    grad_out = torch.randn(out.shape, generator=g, dtype=F64)
    dq, dk, dv = engine.backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse.contiguous(), cu_q, cu_k,
                                 6, 6, **kwargs)
    want_out, want_lse, loss = [], [], 0
    for b, (lq, lk) in enumerate(lengths):
        rows, keys = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, m = dense_entry(q[rows], k[keys], v[keys], 0.7, causal, window_left, window_right, softcap)
        want_out.append(o)
        want_lse.append(m)
        loss = loss + (o * grad_out[rows]).sum()
    torch.testing.assert_close(out, torch.cat(want_out).detach(), rtol=TOL, atol=TOL)
    torch.testing.assert_close(lse, torch.cat(want_lse, 1).detach(), rtol=TOL, atol=TOL)
    for got, want in zip((dq, dk, dv), torch.autograd.grad(loss, (q, k, v), allow_unused=True)):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=TOL, atol=TOL)


def test_prefix_attention_flash_reference_engine_seqused_k_and_offsets():
    """``seqused_k`` limits each entry's keys from its ``cu_seq_k`` offset; offsets may leave keys unused."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, 4, generator=g, dtype=F64)
    k, v = (torch.randn(9, 2, 4, generator=g, dtype=F64) for _ in range(2))
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([1, 4, 9], dtype=torch.int32)
    used = torch.tensor([2, 4], dtype=torch.int32)
    out, lse = flash_engines.REFERENCE.forward(q, k, v, cu_q, cu_k, 3, 5, scale=0.5, causal=True,
                                               window_left=-1, window_right=-1, seqused_k=used)
    for rows, keys in ((slice(0, 2), slice(1, 3)), (slice(2, 5), slice(4, 8))):
        o, m = dense_entry(q[rows], k[keys], v[keys], 0.5, True, -1, -1, 0.0)
        torch.testing.assert_close(out[rows], o, rtol=TOL, atol=TOL)
        torch.testing.assert_close(lse[:, rows], m, rtol=TOL, atol=TOL)


# ---------------------------------------------------------------------------- the plan
def recording_engine(calls):
    """The reference engine, recording the K/V tensors every call is handed."""
    reference = flash_engines.REFERENCE

    def forward(q, k, v, *args, **kwargs):
        calls.append(("forward", k, v))
        return reference.forward(q, k, v, *args, **kwargs)

    def backward(grad_out, q, k, v, *args, **kwargs):
        calls.append(("backward", k, v))
        return reference.backward(grad_out, q, k, v, *args, **kwargs)

    return reference._replace(forward=forward, backward=backward)


@pytest.mark.parametrize("window", [None, 3])
def test_prefix_attention_flash_no_call_copies_shared_kv(window, reference_engine, monkeypatch):
    """Every K/V handed to an engine is a view into the packed K/V; without a window, a run is
    handed once per pass (the bytes handed are at most T x (1 + depth) rows); one level: 2 calls."""
    calls = []
    monkeypatch.setattr(flash_backend, "select_engine", lambda device, dtype: recording_engine(calls))
    for layout in (GroupLayout.from_lengths([9, 4], [[3, 5, 2], [1, 6]]),
                   GroupLayout.from_sequences(random_tree_sequences(4))):
        calls.clear()
        g = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(layout.total_tokens, h, 8, generator=g, dtype=F64, requires_grad=True)
                   for h in (4, 2, 2))
        prefix_attention(q, k, v, layout, backend="flash", window=window).sum().backward()
        base = {k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
        for _, kk, vv in calls:
            assert kk.untyped_storage().data_ptr() in base and vv.untyped_storage().data_ptr() in base
        if window is None:
            depth = max(len(layout.segmentation.key_runs(s)) for s in range(len(layout.segmentation)))
            forwards = [kk for kind, kk, _ in calls if kind == "forward"]
            assert len(forwards) == depth  # the self call and one per depth with descendants
            assert sum(kk.shape[0] for kk in forwards) <= layout.total_tokens * depth
            if layout.is_flat:
                assert len(forwards) == 2 and forwards[1].shape[0] == 9 + 10 + 4  # prompt 0's start to prompt 1's end


def test_prefix_attention_flash_depth_call_entries_and_fillers():
    """One level: the depth call's entries are each prompt against its completions, with a
    filler for the next prompt's rows (no keys) and none needed for keys (prompts are adjacent
    to their completions' range start)."""
    layout = GroupLayout.from_lengths([3, 2], [[2, 1], [4]])  # packed: P0 0-2, C 3-5, P1 6-7, C 8-11
    plan = flash_plan.flash_plan(layout, None)
    assert plan.self_call.host_cu_seq_q == (0, 3, 5, 6, 8, 12) and plan.self_call.causal
    (call,) = plan.calls
    assert call.rows == slice(3, 12) and call.keys == slice(0, 8)
    # entries: (3 completions vs P0), (P1 rows: no keys), (C0's keys: no queries), (group 1's completions vs P1)
    assert call.host_cu_seq_q == (0, 3, 5, 5, 9) and call.host_cu_seq_k == (0, 3, 3, 6, 8)
    assert call.empty_rows.tolist() == [False] * 3 + [True] * 2 + [False] * 4


# ---------------------------------------------------------------------------- engines and auto
def test_prefix_attention_flash_engine_names_and_nesting():
    with pytest.raises(ValueError, match="name must be one of 'auto', 'torch', 'flash_attn', 'reference'"):
        with flash_engine("cudnn"):
            pass
    assert flash_engines.forced_engine() == "auto"
    with flash_engine("reference"):
        with flash_engine("torch"):
            assert flash_engines.forced_engine() == "torch"
        assert flash_engines.forced_engine() == "reference"
    assert flash_engines.forced_engine() == "auto"


def test_prefix_attention_flash_cuda_engines_refuse_what_they_cannot_express():
    torch_engine = flash_engines.TORCH
    assert "softcap" in flash_backend.flash_refusal(torch_engine, 64, 30.0)
    assert "head_dim=12" in flash_backend.flash_refusal(torch_engine, 12, None)
    assert flash_backend.flash_refusal(torch_engine, 128, None) is None
    assert flash_backend.flash_refusal(flash_engines.FLASH_ATTN, 64, 30.0) is None
    reason = flash_engines._cuda_dtype_reason(torch.device("cuda"), torch.float32, "torch")
    if torch.cuda.is_available():
        assert "not float32" in reason and "'triton'" in reason


def test_prefix_attention_flash_auto_never_picks_it_without_measurements():
    layout = GroupLayout.from_lengths([2], [[1]])
    assert flash_backend.FLASH_MEASURED_FASTER == {}
    assert not flash_backend.flash_preferred(torch.device("cpu"), torch.float32, 64, layout, None)
    assert flash_backend.shape_class(layout) == "one-level"
    assert flash_backend.shape_class(GroupLayout.from_sequences([[1, 2, 3], [1, 2, 4, 5], [1, 2, 4, 6]])) == "tree"
