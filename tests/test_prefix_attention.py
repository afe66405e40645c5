"""prefix_attention: the torch backend against the dense reference and the unpacked rows.

Tolerances: fp64 runs compare two exact algorithms, so differences are pure rounding
(~1e-15 relative); we allow 1e-10. fp32 runs accumulate in fp32 over at most ~400 keys;
rounding stays below ~1e-5 relative, we allow 2e-5 relative RMS.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_layout
from prefix_grouper import GroupLayout, available_backends, prefix_attention
from prefix_grouper.attention import prefix_sharing_mask, torch_backend
from prefix_grouper.unpacked import unpacked_prefix_attention


def make_qkv(layout, hq, hkv, d, dtype, generator, requires_grad=True):
    t = layout.total_tokens
    tensors = [torch.randn(t, h, d, generator=generator, dtype=torch.float64).to(dtype)
               for h in (hq, hkv, hkv)]
    return [x.requires_grad_(requires_grad) for x in tensors]


def outputs_and_grads(q, k, v, layout, backend, generator_seed=7, with_lse=True):
    """[out, lse, dq, dk, dv] of a random linear loss (on out and lse, or out alone)."""
    g = torch.Generator().manual_seed(generator_seed)
    if with_lse:
        out, lse = prefix_attention(q, k, v, layout, backend=backend, return_lse=True)
    else:
        out, lse = prefix_attention(q, k, v, layout, backend=backend), None
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    loss = (out * w_out).sum()
    if with_lse:
        loss = loss + (lse * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)).sum()
    return [out, lse, *torch.autograd.grad(loss, (q, k, v))]


NAMES = ["out", "lse", "dq", "dk", "dv"]


def rel_rms(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp(min=1e-30)).item()


@pytest.mark.parametrize("with_lse", [True, False], ids=["lse-path", "fused-path"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (3, 1)])
def test_torch_matches_reference_fp64(seed, hq, hkv, with_lse):
    g = torch.Generator().manual_seed(seed)
    layout = random_layout(g, num_groups=1 + seed)
    q, k, v = make_qkv(layout, hq, hkv, 16, torch.float64, g)
    expected = outputs_and_grads(q, k, v, layout, "reference", with_lse=with_lse)
    actual = outputs_and_grads(q, k, v, layout, "torch", with_lse=with_lse)
    for name, a, e in zip(NAMES, actual, expected):
        if e is None:
            continue
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("engine", ["cpu-fused", "chunked"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
@pytest.mark.parametrize("prefix_lens,suffix_lens", [
    ([97], [[7]]),                                # G = 1
    ([1, 97, 7], [[0, 97, 1], [7], [0, 0, 1]]),   # empty completions, three length buckets
    ([7, 1], [[97, 97, 0, 7], [1, 7]]),
], ids=["G1", "ragged-empty", "ragged"])
def test_torch_matches_reference_fp64_ragged(prefix_lens, suffix_lens, hq, hkv, engine, monkeypatch, generator):
    """Every part and the LSE merge, out and lse with their gradients, on both attention
    engines (the chunked one, which non-CPU devices run, forced here on CPU)."""
    if engine == "chunked":
        monkeypatch.setattr(torch_backend, "engine_for", lambda device, **features: torch_backend.CHUNKED)
    layout = GroupLayout.from_lengths(prefix_lens, suffix_lens)
    q, k, v = make_qkv(layout, hq, hkv, 16, torch.float64, generator)
    expected = outputs_and_grads(q, k, v, layout, "reference")
    actual = outputs_and_grads(q, k, v, layout, "torch")
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def dense_attention_with_lse(q, k, v, query_offset, scale, window=None, softcap=None):
    """Ground truth for the engines: q ``[R, Hq, Lq, D]``, k/v ``[R, Hkv, Lk, D]``, query i at
    key position ``query_offset + i``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    key_minus_query = torch.arange(k.shape[2])[None, :] - (query_offset + torch.arange(q.shape[2]))[:, None]
    visible = key_minus_query <= 0
    if window is not None:
        visible &= key_minus_query > -window
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]) @ v, lse


ENGINES = {"CPU_FLASH": (None, None), "CHUNKED": (None, None), "chunked-window4": (4, None),
           "chunked-softcap": (None, 0.7), "chunked-window1-softcap": (1, 2.0)}


@pytest.mark.parametrize("with_grad_lse", [True, False], ids=["grad-lse", "no-grad-lse"])
@pytest.mark.parametrize("score_block_bytes", [2080, 2**26], ids=["row-and-query-chunks", "one-chunk"])
@pytest.mark.parametrize("query_offset", [0, 5, 13], ids=["causal", "offset5", "dense"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_attention_engines_match_dense(engine, query_offset, score_block_bytes, with_grad_lse, monkeypatch,
                                       generator):
    # 2080 bytes = 5 fp64 query rows of 4 heads x 13 keys: one batch row per chunk, query
    # chunks of 5, 5 and 3, so chunk borders cut the causal diagonal (chunked engines only).
    window, softcap = ENGINES[engine]
    if query_offset == 5 and engine == "CPU_FLASH":
        pytest.skip("the flash engine takes query_offset 0 (causal) or Lk (dense) only")
    if query_offset == 5 and window is not None:
        pytest.skip("the last queries would see no key, which engines do not take")
    if query_offset == 13 and window == 1:
        pytest.skip("in a window of 1, no query after every key sees one")
    monkeypatch.setattr(torch_backend, "CPU_SCORE_BLOCK_BYTES", score_block_bytes)
    monkeypatch.setattr(torch_backend, "MIN_WINDOW_QUERIES", 2)  # several query chunks under a window too
    runner = (getattr(torch_backend, engine) if window is None and softcap is None
              else torch_backend.chunked_engine(window, softcap))
    # After every key, only the first window - 1 queries see one (as in the torch backend's cross calls).
    queries = 13 if window is None or query_offset == 0 else window - 1
    q = torch.randn(3, 4, queries, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 13, 8, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn(3, 4, queries, 8, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(3, 4, queries, generator=generator, dtype=torch.float64) if with_grad_lse else None

    out, lse = dense_attention_with_lse(q, k, v, query_offset, 0.3, window, softcap)
    loss = (out * grad_out).sum() + (0 if grad_lse is None else (lse * grad_lse).sum())
    expected = [out, lse, *torch.autograd.grad(loss, (q, k, v))]
    with torch.no_grad():
        actual_out, actual_lse = runner.forward(q, k, v, query_offset, 0.3)
        actual = [actual_out, actual_lse,
                  *runner.backward(grad_out, q, k, v, out, lse, grad_lse, query_offset, 0.3)]
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)  # fp64: rounding only


@pytest.mark.parametrize("with_lse", [True, False], ids=["lse-path", "fused-path"])
@pytest.mark.parametrize("d", [8, 64])
def test_torch_matches_reference_fp32(d, with_lse, generator):
    layout = GroupLayout.from_lengths([97, 7, 1], [[7, 1, 97], [1], [7, 7]])
    q, k, v = make_qkv(layout, 4, 2, d, torch.float32, generator)
    expected = outputs_and_grads(*[x.detach().double().requires_grad_() for x in (q, k, v)],
                                 layout, "reference", with_lse=with_lse)
    actual = outputs_and_grads(q, k, v, layout, "torch", with_lse=with_lse)
    for name, a, e in zip(NAMES, actual, expected):
        if e is None:
            continue
        assert a.dtype in (torch.float32,), name
        assert rel_rms(a, e) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, generator):
    """Half inputs are computed in fp32 and rounded once: error is that of the rounding."""
    layout = GroupLayout.from_lengths([7, 5], [[3, 1], [4]])
    q, k, v = make_qkv(layout, 2, 1, 16, dtype, generator)
    out = prefix_attention(q, k, v, layout, backend="torch")
    ref = prefix_attention(q.double(), k.double(), v.double(), layout, backend="reference")
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max().item() <= 2 * eps


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_equals_unpacked_rows(backend, generator):
    """Each [prefix; suffix_i] run on its own through causal SDPA (prefix_grouper.unpacked)
    gives the same completion outputs, and the same q/k/v gradients once the G prefix
    copies' gradients are summed."""
    layout = GroupLayout.from_lengths([7, 1, 20], [[1, 7, 3], [5], [2, 9]])
    q, k, v = make_qkv(layout, 4, 2, 8, torch.float64, generator)
    w = torch.randn(layout.total_tokens, 4, 8, generator=generator, dtype=torch.float64)
    completion = layout.token_completion >= 0
    out = prefix_attention(q, k, v, layout, backend=backend)
    expected = unpacked_prefix_attention(q, k, v, layout)
    grads = torch.autograd.grad((out * w)[completion].sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w)[completion].sum(), (q, k, v))
    # Float64 on both sides: only the summation order differs.
    torch.testing.assert_close(out[completion], expected[completion], rtol=1e-10, atol=1e-10)
    for name, a, e in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_prefix_outputs_are_plain_causal_attention(generator):
    layout = GroupLayout.from_lengths([9], [[4, 2]])
    q, k, v = make_qkv(layout, 2, 2, 8, torch.float64, generator, requires_grad=False)
    out = prefix_attention(q, k, v, layout, backend="torch")
    causal = F.scaled_dot_product_attention(
        q[:9].transpose(0, 1), k[:9].transpose(0, 1), v[:9].transpose(0, 1), is_causal=True)
    torch.testing.assert_close(out[:9], causal.transpose(0, 1), rtol=1e-12, atol=1e-12)


def test_leading_batch_dim_and_scale(generator):
    layout = GroupLayout.from_lengths([5], [[3, 2]])
    q, k, v = make_qkv(layout, 2, 1, 8, torch.float64, generator, requires_grad=False)
    out, lse = prefix_attention(q[None], k[None], v[None], layout, softmax_scale=0.3, return_lse=True)
    ref, ref_lse = prefix_attention(q, k, v, layout, softmax_scale=0.3, backend="reference",
                                    return_lse=True)
    assert out.shape == (1, *q.shape) and lse.shape == (1, layout.total_tokens, 2)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(lse[0], ref_lse)


def test_non_contiguous_inputs(generator):
    layout = GroupLayout.from_lengths([6, 3], [[2, 5], [1]])
    t = layout.total_tokens
    qkv = torch.randn(t, 3, 2, 8, generator=generator, dtype=torch.float64)
    q, k, v = qkv.unbind(1)  # strided views
    torch.testing.assert_close(prefix_attention(q, k, v, layout, backend="torch"),
                               prefix_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                layout, backend="reference"))


@pytest.mark.parametrize("with_lse", [True, False], ids=["lse-path", "fused-path"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_completions_empty(backend, with_lse, generator):
    """Prefix-only batches are plain causal attention per prefix."""
    layout = GroupLayout.from_lengths([4, 3], [[0, 0], [0]])
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = make_qkv(layout, 2, 1, 16, dtype, generator)
    actual = outputs_and_grads(q, k, v, layout, backend, with_lse=with_lse)
    expected = outputs_and_grads(*[x.detach().double().requires_grad_() for x in (q, k, v)], layout, "reference",
                                 with_lse=with_lse)
    for name, a, e in zip(NAMES, actual, expected):
        if e is not None:
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5, msg=name)


def test_scale_accepts_numpy_and_tensor_scalars(small):
    np = pytest.importorskip("numpy")
    layout, q, k, v = small
    expected = prefix_attention(q, k, v, layout, softmax_scale=0.25)
    for scale in (np.float32(0.25), torch.tensor(0.25), 0.25):
        torch.testing.assert_close(prefix_attention(q, k, v, layout, softmax_scale=scale), expected)


def test_auto_on_cpu_is_torch():
    assert available_backends("cpu")[:2] == ["reference", "torch"]


# ---------------------------------------------------------------------------- errors
@pytest.fixture
def small():
    layout = GroupLayout.from_lengths([3], [[2, 1]])
    t = layout.total_tokens
    return layout, torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)


def test_error_wrong_rank(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q must be token-first \[T, heads, head_dim\] or \[1, T, heads, "
                                         r"head_dim\].*head-first \[1, heads, T, head_dim\] must be transposed"
                                         r".*got q of shape \(4, 8\)"):
        prefix_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match=r"k must be \[1, T, heads, head_dim\]"):
        prefix_attention(q[None], k, v[None], layout)
    with pytest.raises(ValueError, match=r"q must be \[1, T, heads, head_dim\]"):
        prefix_attention(torch.stack([q, q]), torch.stack([k, k]), torch.stack([v, v]), layout)


def test_error_tokens_mismatch(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q has 5 tokens but the layout packs T=6: expected token-first "
                                         r"\[T, heads, head_dim\].*got q of shape \(5, 4, 8\)"):
        prefix_attention(q[:5], k[:5], v[:5], layout)


def test_error_head_first_layout_is_named(small):
    """transformers hands attention functions [1, H, T, D]: the error says so and how to fix it."""
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q has 4 tokens but the layout packs T=6: it looks head-first "
                                         r"\(\[1, heads, T, head_dim\]\).*x.transpose\(1, 2\).*"
                                         r"got q of shape \(1, 4, 6, 8\)"):
        prefix_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), layout)


def test_error_heads(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        prefix_attention(q, torch.randn(6, 3, 8), torch.randn(6, 3, 8), layout)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        prefix_attention(q, k, v[:, :1], layout)
    with pytest.raises(ValueError, match="head_dim 4 must equal q head_dim 8"):
        prefix_attention(q, k[..., :4], v[..., :4], layout)
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\], got 300"):
        prefix_attention(torch.randn(6, 1, 300), torch.randn(6, 1, 300), torch.randn(6, 1, 300), layout)


def test_error_dtype(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        prefix_attention(q, k.double(), v, layout)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.int64"):
        prefix_attention(q.long(), k.long(), v.long(), layout)


def test_error_device(small):
    layout, q, k, v = small
    meta = GroupLayout.from_lengths([3], [[2, 1]], device="meta")
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        prefix_attention(q, k.to("meta"), v, layout)
    with pytest.raises(ValueError, match="layout is on meta but q is on cpu"):
        prefix_attention(q, k, v, meta)


def test_error_layout_and_scale(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match="layout must be a GroupLayout"):
        prefix_attention(q, k, v, [3, 2, 1])
    with pytest.raises(ValueError, match="softmax_scale must be .*got nan"):
        prefix_attention(q, k, v, layout, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="softmax_scale must be a real number, got bool"):
        prefix_attention(q, k, v, layout, softmax_scale=True)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        prefix_attention(q, k, v, layout, return_lse="yes")


def test_error_backend(small, monkeypatch):
    layout, q, k, v = small
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(q, k, v, layout, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' is not available on cpu"):
        prefix_attention(q, k, v, layout, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="backend='triton' is not available on cpu for float64: .*support float16, "
                                        "bfloat16 and float32"):
        prefix_attention(q.double(), k.double(), v.double(), layout, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="Triton interpreter.*not bfloat16"):
            prefix_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync_in_forward_and_backward(backend, generator):
    layout = GroupLayout.from_lengths([7, 33], [[5, 1, 0], [17]], device="cuda")
    q, k, v = (x.detach().to("cuda", torch.bfloat16).requires_grad_()
               for x in make_qkv(layout, 4, 2, 64, torch.float32, generator))
    prefix_attention(q, k, v, layout, backend=backend).sum().backward()  # warm caches/compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = prefix_attention(q, k, v, layout, backend=backend, return_lse=True)
        (out.float().sum() + lse.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------- non-finite inputs
def poisoned_rows_and_keys(layout, token):
    """Rows a NaN in K/V of ``token`` may reach, and the keys whose gradients it may reach.

    The contract: a completion token's K/V reaches only its completion's rows, a prefix
    token's only its group's rows (rows that mask it still multiply it by a zero
    probability inside their segment's block). Gradients then reach every key those rows see.
    """
    group = layout.token_group[token]
    if layout.token_completion[token] >= 0:
        rows = layout.token_completion == layout.token_completion[token]
    else:
        rows = layout.token_group == group
    return rows, prefix_sharing_mask(layout)[rows].any(0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["completion", "prefix"])
@pytest.mark.parametrize("backend,with_lse,chunked", [("reference", True, False), ("torch", True, False),
                                                       ("torch", False, False), ("torch", True, True),
                                                       ("triton", True, False)],
                         ids=["reference", "torch-lse", "torch-fused", "torch-chunked", "triton"])
def test_non_finite_kv_stays_in_its_segment(backend, with_lse, chunked, where, value, generator, monkeypatch):
    # Group 0's second completion (packed 7..9) is poisoned, or group 1's prefix (11..13);
    # the sibling completions, the other group and padding rows of the padded batches must
    # not see it. Ragged lengths make every padded batch pad.
    layout = GroupLayout.from_lengths([4, 3], [[3, 3, 1], [2, 5]])
    token = 8 if where == "completion" else 12
    if chunked:  # the engine of non-CPU devices, forced on CPU
        monkeypatch.setattr(torch_backend, "engine_for", lambda device, **features: torch_backend.CHUNKED)
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton: fp32 under the interpreter
    q, k, v = make_qkv(layout, 4, 2, 8, dtype, generator, requires_grad=False)
    clean = outputs_and_grads(*(x.clone().requires_grad_() for x in (q, k, v)), layout, backend,
                              with_lse=with_lse)
    k[token, 1], v[token, 0] = value, value
    poisoned = outputs_and_grads(*(x.clone().requires_grad_() for x in (q, k, v)), layout, backend,
                                 with_lse=with_lse)
    rows, keys = poisoned_rows_and_keys(layout, token)
    assert not poisoned[0][rows].isfinite().all()  # the poison is there, not masked away
    # Unaffected rows and keys run exactly the same operations on the same values.
    for name, a, e in zip(NAMES, poisoned, clean):
        if e is None:
            continue
        unaffected = ~keys if name in ("dk", "dv") else ~rows
        assert torch.equal(a[unaffected], e[unaffected]), name


def test_leading_batch_dim_without_lse(small):
    """The documented [1, T, H, D] form on the torch backend, lse not requested."""
    layout, q, k, v = small
    out = prefix_attention(q[None], k[None], v[None], layout, backend="torch")
    assert out.shape == (1, *q.shape)
    torch.testing.assert_close(out[0], prefix_attention(q, k, v, layout, backend="reference"))


@pytest.mark.parametrize("scale", [1e300, 1e39, 1e-300, 1e-46])
def test_error_scale_outside_float32(small, scale):
    """The kernels multiply by softmax_scale * log2(e) in float32: it must be finite and nonzero there."""
    layout, q, k, v = small
    with pytest.raises(ValueError, match="softmax_scale .*float32"):
        prefix_attention(q, k, v, layout, softmax_scale=scale)


def test_error_zero_heads(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q must have at least one head, got shape \(6, 0, 8\)"):
        prefix_attention(q[:, :0], k, v, layout)
    with pytest.raises(ValueError, match=r"k must have at least one head, got shape \(6, 0, 8\)"):
        prefix_attention(q, k[:, :0], v[:, :0], layout)
