"""backend="flash" on CPU: the whole composition (plan, varlen calls, LSE merge, backward on
the merged out/LSE, the LSE-gradient run, sinks) through the ``reference`` varlen engine,
against float64 oracles that share no code with it; the reference engine's own contract
against dense attention written here; the plan's calls (no K/V copies); errors.

Tolerance 1e-10 in float64: the composition and the oracles differ only in summation order
(~1e-15 relative); a wrong mask, a lost term or a base-2 LSE moves values by O(0.1).
"""
import contextvars
import math

import pytest
import torch
from test_prefix_attention_features import FEATURES as ONE_LEVEL_FEATURES
from test_prefix_attention_features import LAYOUTS, assert_all_close, backend, make_inputs, per_row_attention
from test_prefix_attention_features import resolve, with_grads
from test_prefix_attention_tree import FEATURES as TREE_FEATURES
from test_prefix_attention_tree import check_against_sequences, random_tree_sequences

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper._dispatch import BackendUnavailableError
from prefix_grouper.attention import available_backends, flash_backend, flash_engine, flash_engines, flash_plan

F64 = torch.float64
TOL = 1e-10


@pytest.fixture
def reference_engine(monkeypatch):
    """``flash_engine("reference")`` for the whole test (the module-level helpers call prefix_attention)."""
    monkeypatch.setattr(flash_engines, "_FORCED", contextvars.ContextVar("test_flash_engine", default="reference"))


# ---------------------------------------------------------------------------- the composition
@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 3), (4, 1)])
@pytest.mark.parametrize("feature", list(ONE_LEVEL_FEATURES))
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_one_level_matches_reference_fp64(layout_name, feature, hq, hkv, reference_engine, generator):
    layout = GroupLayout.from_lengths(*LAYOUTS[layout_name])
    features = resolve(ONE_LEVEL_FEATURES[feature], layout, hq)
    q, k, v = make_inputs(layout, hq, hkv, 8, generator)
    expected = with_grads(backend("reference", layout), q, k, v, features)
    assert_all_close(with_grads(backend("flash", layout), q, k, v, features), expected)


@pytest.mark.parametrize("feature", ["plain", "window3", "softcap2", "sinks-large", "window5-softcap2-sinks"])
def test_one_level_matches_independent_rows(feature, reference_engine, generator):
    """Against per-row dense attention written in the features test (no library code)."""
    layout = GroupLayout.from_lengths([5, 1, 9], [[3, 0, 6], [1], [2, 4, 1, 1]])
    features = resolve(ONE_LEVEL_FEATURES.get(feature, {}), layout, 6)
    q, k, v = make_inputs(layout, 6, 3, 7, generator)
    out, lse = prefix_attention(q, k, v, layout, backend="flash", return_lse=True, **features)
    want_out, want_lse = per_row_attention(q, k, v, layout, **features)
    torch.testing.assert_close(out, want_out, rtol=TOL, atol=TOL)
    torch.testing.assert_close(lse, want_lse, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("feature", list(TREE_FEATURES))
@pytest.mark.parametrize("seed", range(5))
def test_random_trees_match_per_sequence_attention(seed, feature, reference_engine):
    """Trees of random depth and fan-out (duplicates, prefixes of others), per sequence."""
    layout = GroupLayout.from_sequences(random_tree_sequences(seed))
    check_against_sequences(layout, 6, 2, 7, TREE_FEATURES[feature], "flash", seed)


@pytest.mark.parametrize("feature", ["plain", "window5", "window4-softcap-sinks", "softcap", "sinks"])
def test_depth_six_chain_with_odd_sizes(feature, reference_engine):
    """Every sequence extends the previous one and branches once: depth 6+, runs of 1/7/97, MQA."""
    history, sequences = [], []
    for step, step_len in enumerate((7, 1, 97, 1, 7, 1)):
        history = history + [1000 * step + i for i in range(step_len)]
        sequences += [history, history + [99_000 + step]]
    layout = GroupLayout.from_sequences(sequences)
    assert max(len(layout.segmentation.key_runs(s)) for s in range(len(layout.segmentation))) >= 6
    check_against_sequences(layout, 3, 1, 5, TREE_FEATURES[feature], "flash")


@pytest.mark.parametrize("feature", ["plain", "window4-softcap-sinks"])
def test_system_prompt_shared_across_groups(feature, reference_engine):
    system = list(range(100, 109))
    sequences = [system + [1, 2, 3] + [7, 8], system + [1, 2, 3] + [9], system + [4, 5, 6, 7] + [10, 11, 12]]
    layout = GroupLayout.from_sequences(sequences)
    assert len(layout.segmentation.groups) == 1
    check_against_sequences(layout, 4, 2, 4, TREE_FEATURES[feature], "flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_through_the_reference_engine(dtype, reference_engine, generator):
    """Half/float32 inputs: computed in float32 per call, merged in float32, output in the dtype."""
    layout = GroupLayout.from_lengths([6, 3], [[4, 1], [5]])
    q, k, v = (x.detach().to(dtype) for x in make_inputs(layout, 4, 2, 8, generator))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out, lse = prefix_attention(q, k, v, layout, backend="flash", return_lse=True, window=3, sinks=sinks)
    want, want_lse = prefix_attention(*(x.double() for x in (q, k, v)), layout, backend="reference", window=3,
                                      sinks=sinks.double(), return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    bound = 1e-5 if dtype == torch.float32 else 2e-2  # one rounding of the output to the dtype
    torch.testing.assert_close(out.double(), want, rtol=bound, atol=bound)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_non_finite_kv_stays_in_its_subtree(reference_engine):
    """A NaN/inf in a completion's K/V reaches only that completion's rows; other rows and gradients are bitwise clean."""
    layout = GroupLayout.from_lengths([4, 3], [[3, 3, 1], [2, 5]])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(layout.total_tokens, 2, 4, generator=g, dtype=F64) for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g, dtype=F64)

    def run(poison):
        leaves = [x.clone() for x in (q, k, v)]
        if poison:
            leaves[1][8, 1], leaves[2][8, 0] = float("nan"), float("inf")
        leaves = [x.requires_grad_() for x in leaves]
        out = prefix_attention(*leaves, layout, backend="flash")
        return [out, *torch.autograd.grad((out * grad_out).sum(), leaves)]

    clean, poisoned = run(False), run(True)
    rows = torch.zeros(layout.total_tokens, dtype=torch.bool)
    rows[7:10] = True  # group 0's second completion
    keys = rows.clone()
    keys[:4] = True  # ... and the prompt it sees
    for name, a, e in zip(["out", "dq", "dk", "dv"], poisoned, clean):
        unaffected = ~keys if name in ("dk", "dv") else ~rows
        assert torch.equal(a[unaffected], e[unaffected]), name


# ---------------------------------------------------------------------------- the reference engine's contract
def dense_entry(q, k, v, scale, causal, window_left, window_right, softcap):
    """One entry written from the contract: query i at key index i + Lk - Lq (bottom-right)."""
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            a = i + lk - lq
            right = 0 if causal else window_right
            allowed[i, j] = (right < 0 or j <= a + right) and (window_left < 0 or j >= a - window_left)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    sees = allowed.any(1)
    probs = torch.where(sees[None, :, None], torch.exp(s - lse[..., None]), 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, torch.where(sees[None, :], lse, float("inf"))


@pytest.mark.parametrize("causal,window_left,window_right", [(True, -1, -1), (False, -1, -1), (True, 2, -1),
                                                             (False, 3, -1), (False, 1, 2), (False, -1, 1)])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_reference_engine_matches_dense_entries(causal, window_left, window_right, softcap):
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


def test_reference_engine_seqused_k_and_offsets():
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
def test_no_call_copies_shared_kv(window, reference_engine, monkeypatch):
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


def test_depth_call_entries_and_fillers():
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


# ---------------------------------------------------------------------------- availability and errors
def test_flash_is_unavailable_on_cpu_without_the_reference_engine():
    layout = GroupLayout.from_lengths([2], [[1]])
    q = torch.randn(3, 2, 8)
    assert "flash" not in available_backends("cpu")
    with pytest.raises(BackendUnavailableError, match="flash.*needs CUDA tensors.*flash_engine\\('reference'\\)"):
        prefix_attention(q, q, q, layout, backend="flash")
    with flash_engine("reference"):
        assert "flash" in available_backends("cpu")
        prefix_attention(q, q, q, layout, backend="flash")
        assert prefix_attention(q, q, q, layout).shape == q.shape  # "auto" stays torch on CPU
    with flash_engine("torch"), pytest.raises(BackendUnavailableError, match="'torch' engine.*CUDA"):
        prefix_attention(q, q, q, layout, backend="flash")


def test_flash_engine_names_and_nesting():
    with pytest.raises(ValueError, match="name must be one of 'auto', 'torch', 'flash_attn', 'reference'"):
        with flash_engine("cudnn"):
            pass
    assert flash_engines.forced_engine() == "auto"
    with flash_engine("reference"):
        with flash_engine("torch"):
            assert flash_engines.forced_engine() == "torch"
        assert flash_engines.forced_engine() == "reference"
    assert flash_engines.forced_engine() == "auto"


def test_cuda_engines_refuse_what_they_cannot_express():
    torch_engine = flash_engines.TORCH
    assert "softcap" in flash_backend.flash_refusal(torch_engine, 64, 30.0)
    assert "head_dim=12" in flash_backend.flash_refusal(torch_engine, 12, None)
    assert flash_backend.flash_refusal(torch_engine, 128, None) is None
    assert flash_backend.flash_refusal(flash_engines.FLASH_ATTN, 64, 30.0) is None
    reason = flash_engines._cuda_dtype_reason(torch.device("cuda"), torch.float32, "torch")
    if torch.cuda.is_available():
        assert "not float32" in reason and "'triton'" in reason


def test_auto_never_picks_flash_without_measurements():
    layout = GroupLayout.from_lengths([2], [[1]])
    assert flash_backend.FLASH_MEASURED_FASTER == {}
    assert not flash_backend.flash_preferred(torch.device("cpu"), torch.float32, 64, layout, None)
    assert flash_backend.shape_class(layout) == "one-level"
    assert flash_backend.shape_class(GroupLayout.from_sequences([[1, 2, 3], [1, 2, 4, 5], [1, 2, 4, 6]])) == "tree"


def test_lse_gradient_alone(reference_engine, generator):
    """A loss on the LSE only (no output gradient): the e_0 run carries it exactly."""
    layout = GroupLayout.from_sequences(random_tree_sequences(7))
    q, k, v = make_inputs(layout, 4, 2, 5, generator)
    sinks = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=F64, requires_grad=True)
    grads = []
    for name in ("flash", "reference"):
        _, lse = prefix_attention(q, k, v, layout, backend=name, return_lse=True, softcap=3.0, sinks=sinks)
        grads.append(torch.autograd.grad((lse * torch.arange(lse.numel()).reshape(lse.shape).sin()).sum(),
                                         (q, k, sinks)))  # the LSE does not depend on v
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert math.isfinite(float(grads[0][0].abs().sum()))
