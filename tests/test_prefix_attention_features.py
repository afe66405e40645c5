"""prefix_attention's window, softcap and sinks (issue 15) on the reference and torch backends.

The reference is checked against each unpacked [prompt; completion] row computed on its own
(window, softcap and sink math written out in row coordinates), the window boundary against
transformers' own sliding-window mask, and the torch backend against the reference for
outputs, lse and the gradients of q, k, v and sinks.

Tolerances: float64 runs compare exact algorithms that differ only in summation order;
rounding is ~1e-15 relative, we allow rtol = atol = 1e-10 (values and gradients are O(1) to
O(100) here, so 1e-10 absolute is still ~1e-12 relative). float32 runs accumulate over at
most ~200 keys: ~1e-6 relative RMS, we allow 2e-5.
"""
import inspect
import math

import pytest
import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import prefix_sharing_mask, torch_backend

F64 = torch.float64

LAYOUTS = {
    "G1-1x1": ([1], [[1]]),                                  # one token of prompt and completion
    "G1-97x7": ([97], [[7]]),                                # window cases inside a long prompt
    "ragged": ([7, 1, 97], [[97, 0, 1, 7], [7], [1, 0]]),   # empty completions, three length buckets
}

# Name -> prefix_attention keywords; "longest" stands for the layout's longest row (window
# exactly at the boundary where it masks nothing), "longest-1" for one less (it masks the
# longest row's first key from its last query only).
FEATURES = {
    "window1": {"window": 1},
    "window3": {"window": 3},
    "window8": {"window": 8},
    "window-huge": {"window": 10_000},
    "window-longest": {"window": "longest"},
    "window-longest-1": {"window": "longest-1"},
    "softcap2": {"softcap": 2.0},
    "softcap30": {"softcap": 30.0},
    "sinks-large": {"sinks": [9.0, 6.0, 12.0, 8.0, 7.0, 10.0]},
    "sinks-small": {"sinks": [-9.0, -30.0, -2.0, 0.0, -5.0, 0.5]},
    "window5-softcap2-sinks": {"window": 5, "softcap": 2.0, "sinks": [1.0, -1.0, 3.0, 0.0, -4.0, 2.0]},
    "window1-sinks": {"window": 1, "sinks": [0.5, -0.5, 2.0, -2.0, 1.0, 0.0]},
    "window2-softcap3": {"window": 2, "softcap": 3.0},
}


def longest_row(layout):
    return max(p + max(s, default=0) for p, s in zip(layout.prefix_lens_list, layout.suffix_lens_per_group))


def resolve(features, layout, hq):
    """The keywords with ``window`` placeholders resolved and sinks as a float64 ``[hq]`` tensor."""
    out = dict(features)
    if out.get("window") == "longest":
        out["window"] = longest_row(layout)
    elif out.get("window") == "longest-1":
        out["window"] = max(1, longest_row(layout) - 1)
    if "sinks" in out:
        out["sinks"] = torch.tensor(out["sinks"][:hq], dtype=F64)
    return out


def make_inputs(layout, hq, hkv, d, generator, dtype=F64, score_size=3.0):
    """q, k, v whose scaled scores have a standard deviation of about ``score_size``: large
    enough that softcap 2 saturates and the softmax is far from uniform."""
    t = layout.total_tokens
    q = torch.randn(t, hq, d, generator=generator, dtype=F64) * math.sqrt(score_size)
    k = torch.randn(t, hkv, d, generator=generator, dtype=F64) * math.sqrt(score_size)
    v = torch.randn(t, hkv, d, generator=generator, dtype=F64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def with_grads(run, q, k, v, features, seed=5):
    """``[out, lse, dq, dk, dv(, dsinks)]`` of a random linear loss on out and lse."""
    features = dict(features)
    leaves = [q, k, v]
    if features.get("sinks") is not None:
        features["sinks"] = features["sinks"].detach().clone().requires_grad_()
        leaves.append(features["sinks"])
    out, lse = run(q, k, v, **features)
    g = torch.Generator().manual_seed(seed)
    loss = ((out * torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)).sum()
            + (lse * torch.randn(lse.shape, generator=g, dtype=F64).to(lse.dtype)).sum())
    return [out, lse, *torch.autograd.grad(loss, leaves)]


def backend(name, layout):
    return lambda q, k, v, **f: prefix_attention(q, k, v, layout, backend=name, return_lse=True, **f)


NAMES = ["out", "lse", "dq", "dk", "dv", "dsinks"]


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-10):
    assert len(actual) == len(expected)
    for name, a, e in zip(NAMES, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------- independent per-row math
def per_row_attention(q, k, v, layout, *, window=None, softcap=None, sinks=None):
    """``(out [T, Hq, D], lse [T, Hq])`` with every unpacked row run on its own, float64.

    A prompt token's output is that of the prompt alone; a completion token's that of its
    ``[prompt; completion]`` row. Row index i of the row is the token's position; the query
    at i sees keys j with ``j <= i`` and ``j > i - window``. Scores are ``q.k / sqrt(D)``,
    then ``softcap * tanh(s / softcap)``; the sink is one more logit with no value.
    """
    t, hq, d = q.shape
    per_kv = hq // k.shape[1]
    scale = 1 / math.sqrt(d)
    outs, lses, tokens = [], [], []
    start = 0
    for prefix_len, suffix_lens in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        prompt = list(range(start, start + prefix_len))
        start += prefix_len
        rows = [(prompt, prompt)]  # (the row's tokens, the tokens whose outputs it gives)
        for suffix_len in suffix_lens:
            completion = list(range(start, start + suffix_len))
            start += suffix_len
            rows.append((prompt + completion, completion))
        for row, wanted in rows:
            length = len(row)
            i = torch.arange(length)[:, None]
            j = torch.arange(length)[None, :]
            visible = j <= i
            if window is not None:
                visible = visible & (j > i - window)
            for h in range(hq):
                qh, kh, vh = q[row, h], k[row, h // per_kv], v[row, h // per_kv]
                s = (qh @ kh.T) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                s = s.masked_fill(~visible, float("-inf"))
                logits = s if sinks is None else torch.cat([s, sinks[h].expand(length, 1)], 1)
                row_max = logits.max(1, keepdim=True).values
                denominator = torch.exp(logits - row_max).sum(1, keepdim=True)
                probs = torch.exp(s - row_max) / denominator
                first = length - len(wanted)
                outs.append((probs @ vh)[first:])
                lses.append((row_max + torch.log(denominator))[first:, 0])
                tokens.append((wanted, h))
    out = q.new_zeros(t, hq, d)
    lse = q.new_zeros(t, hq)
    for (wanted, h), o, m in zip(tokens, outs, lses):
        out = out.index_put((torch.tensor(wanted, dtype=torch.long), torch.full((len(wanted),), h)), o)
        lse = lse.index_put((torch.tensor(wanted, dtype=torch.long), torch.full((len(wanted),), h)), m)
    return out, lse


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_reference_matches_unpacked_rows(layout_name, feature):
    layout = GroupLayout.from_lengths(*LAYOUTS[layout_name])
    g = torch.Generator().manual_seed(0)
    q, k, v = make_inputs(layout, 6, 2, 8, g)
    features = resolve(FEATURES[feature], layout, 6)
    expected = with_grads(lambda *x, **f: per_row_attention(*x, layout, **f), q, k, v, features)
    actual = with_grads(backend("reference", layout), q, k, v, features)
    assert_all_close(actual, expected)


def test_features_change_the_result():
    """The per-row checks can fail: every feature moves outputs well beyond the tolerance."""
    layout = GroupLayout.from_lengths(*LAYOUTS["ragged"])
    q, k, v = make_inputs(layout, 6, 2, 8, torch.Generator().manual_seed(0))
    plain = prefix_attention(q, k, v, layout, backend="reference")
    for feature in ("window3", "softcap2", "sinks-large", "sinks-small", "window-longest-1"):
        changed = prefix_attention(q, k, v, layout, backend="reference", **resolve(FEATURES[feature], layout, 6))
        assert (changed - plain).abs().max() > 1e-6, feature
    # A window of the longest row masks nothing: bitwise the same computation.
    same = prefix_attention(q, k, v, layout, backend="reference", window=longest_row(layout))
    assert torch.equal(same, plain)


# ---------------------------------------------------------------------------- transformers' masks
@pytest.mark.parametrize("window", [1, 2, 5, 7, 9, 12, 100])
def test_window_boundary_matches_transformers_mask(window):
    """One row, [prompt 7; completion 5], against transformers' sliding-window causal mask
    (``create_sliding_window_causal_mask`` of a Mistral config, as Mistral/Qwen2/Gemma/gpt-oss
    sliding layers build it), and the bare mask function."""
    transformers = pytest.importorskip("transformers")
    from transformers.masking_utils import create_sliding_window_causal_mask, sliding_window_causal_mask_function

    layout = GroupLayout.from_lengths([7], [[4, 5]])
    row = list(range(7)) + list(range(11, 16))  # the prompt and the second completion
    ours = prefix_sharing_mask(layout, window)[row][:, row]
    config = transformers.MistralConfig(sliding_window=window, hidden_size=8, num_attention_heads=2,
                                        num_key_value_heads=1, num_hidden_layers=1, intermediate_size=8,
                                        vocab_size=10)
    config._attn_implementation = "sdpa"
    length = len(row)
    # transformers 5.10 names the cache argument past_key_values and has no allow_is_causal_skip;
    # there, a mask that equals plain causal attention comes back as None (SDPA's is_causal).
    parameters = inspect.signature(create_sliding_window_causal_mask).parameters
    version_kwargs = {"cache": None} if "cache" in parameters else {"past_key_values": None}
    if "allow_is_causal_skip" in parameters:
        version_kwargs["allow_is_causal_skip"] = False
    theirs = create_sliding_window_causal_mask(
        config=config, inputs_embeds=torch.zeros(1, length, 8), attention_mask=torch.ones(1, length, dtype=torch.long),
        position_ids=torch.arange(length)[None], **version_kwargs)
    if theirs is None:
        theirs = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    assert theirs.dtype == torch.bool and theirs.shape == (1, 1, length, length)
    assert torch.equal(ours, theirs[0, 0])
    function = sliding_window_causal_mask_function(window)
    index = torch.arange(length)
    by_function = torch.stack([torch.stack([function(0, 0, i, j) for j in index]) for i in index])
    assert torch.equal(ours, by_function)


# ---------------------------------------------------------------------------- torch backend vs reference
def force_chunked(monkeypatch):
    """The explicit-score engine that non-CPU devices run, forced for every call on CPU."""
    monkeypatch.setattr(torch_backend, "engine_for",
                        lambda device, window=None, softcap=None: torch_backend.chunked_engine(window, softcap))


@pytest.mark.parametrize("engine", ["auto", "chunked"])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 3)])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_torch_matches_reference_fp64(layout_name, feature, hq, hkv, engine, monkeypatch):
    if engine == "chunked":
        force_chunked(monkeypatch)
    layout = GroupLayout.from_lengths(*LAYOUTS[layout_name])
    q, k, v = make_inputs(layout, hq, hkv, 16, torch.Generator().manual_seed(1))
    features = resolve(FEATURES[feature], layout, hq)
    expected = with_grads(backend("reference", layout), q, k, v, features)
    actual = with_grads(backend("torch", layout), q, k, v, features)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("feature", ["window3", "window8", "window5-softcap2-sinks", "softcap2"])
def test_torch_chunk_borders_and_skipped_keys(feature, monkeypatch):
    """Tiny chunks: query chunks cut every segment (and the window's diagonal band) and most
    key ranges start after key 0, so the skipped keys and per-chunk masks are exercised."""
    force_chunked(monkeypatch)
    monkeypatch.setattr(torch_backend, "CPU_SCORE_BLOCK_BYTES", 6 * 11 * 8 * 3)  # ~3 queries of 6 heads x 11 keys
    monkeypatch.setattr(torch_backend, "MIN_WINDOW_QUERIES", 2)
    layout = GroupLayout.from_lengths([23, 5], [[19, 1, 0], [30]])
    q, k, v = make_inputs(layout, 6, 2, 8, torch.Generator().manual_seed(2))
    features = resolve(FEATURES[feature], layout, 6)
    assert_all_close(with_grads(backend("torch", layout), q, k, v, features),
                     with_grads(backend("reference", layout), q, k, v, features))


def test_window_skips_key_chunks():
    """A window bounds the keys each chunk scores: O(T * (window + chunk)) work, not O(T^2)."""
    q = torch.zeros(1, 4, 2000, 8)
    k = torch.zeros(1, 2, 2000, 8)
    scored = {window: sum((qs.stop - qs.start) * (ks.stop - ks.start)
                          for _, qs, ks, _ in torch_backend._chunks(q, k, 0, window))
              for window in (None, 16, 300)}
    assert scored[None] >= 2000 * 2001 // 2
    assert scored[16] <= 2000 * (torch_backend.MIN_WINDOW_QUERIES + 16)
    assert scored[300] <= 2000 * 2 * 300


@pytest.mark.parametrize("feature", ["window3", "softcap2", "sinks-large", "window5-softcap2-sinks"])
def test_torch_fp32_matches_reference(feature):
    layout = GroupLayout.from_lengths([97, 7, 1], [[7, 1, 97], [1], [7, 7]])
    q, k, v = make_inputs(layout, 6, 2, 16, torch.Generator().manual_seed(3), dtype=torch.float32)
    features = resolve(FEATURES[feature], layout, 6)
    features32 = {**features, "sinks": features["sinks"].float()} if "sinks" in features else features
    actual = with_grads(backend("torch", layout), q, k, v, features32)
    expected = with_grads(backend("reference", layout), *(x.detach().double().requires_grad_() for x in (q, k, v)),
                          features)
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype == torch.float32, name
        a, e = a.double(), e.double()
        assert ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item() < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Half inputs (and sinks) are computed in fp32 and rounded once: the error is that rounding's."""
    layout = GroupLayout.from_lengths([9, 5], [[3, 1], [4]])
    q, k, v = make_inputs(layout, 4, 2, 16, torch.Generator().manual_seed(8), dtype=dtype)
    sinks = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=dtype)
    out = prefix_attention(q, k, v, layout, backend="torch", window=4, softcap=2.0, sinks=sinks)
    ref = prefix_attention(*(x.double() for x in (q, k, v)), layout, backend="reference", window=4, softcap=2.0,
                           sinks=sinks.double())
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max().item() <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("backend_name", ["reference", "torch"])
@pytest.mark.parametrize("sinks_dtype", [torch.float32, torch.bfloat16])
def test_sinks_of_another_dtype(backend_name, sinks_dtype):
    """Sinks may have any float dtype: they are used in the compute dtype and their gradient
    comes back in their own."""
    layout = GroupLayout.from_lengths([7], [[5, 1]])
    q, k, v = make_inputs(layout, 4, 2, 8, torch.Generator().manual_seed(4))
    sinks = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=sinks_dtype, requires_grad=True)
    out = prefix_attention(q, k, v, layout, sinks=sinks, backend=backend_name)
    (grad,) = torch.autograd.grad(out.sum(), sinks)
    assert out.dtype == F64 and grad.dtype == sinks_dtype
    expected = prefix_attention(q, k, v, layout, sinks=sinks.detach().double(), backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_leading_batch_dim_with_features():
    layout = GroupLayout.from_lengths([6], [[3, 4]])
    q, k, v = make_inputs(layout, 4, 2, 8, torch.Generator().manual_seed(6))
    features = {"window": 4, "softcap": 2.0, "sinks": torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=F64)}
    out, lse = prefix_attention(q[None], k[None], v[None], layout, return_lse=True, **features)
    ref, ref_lse = prefix_attention(q, k, v, layout, backend="reference", return_lse=True, **features)
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse[0], ref_lse, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("where", ["completion", "prefix"])
@pytest.mark.parametrize("engine", ["reference", "torch-auto", "torch-chunked"])
@pytest.mark.parametrize("feature", ["window3", "softcap2", "sinks-large", "window5-softcap2-sinks"])
def test_non_finite_kv_stays_in_its_segment(feature, engine, where, monkeypatch):
    """The containment of test_prefix_attention, with features: a NaN in a completion
    token's K/V reaches only its completion's rows, one in a prefix token only its group's
    rows, and the q/k/v gradients of every other row/key are bitwise those of a clean batch
    (the sinks' gradient sums every row, so it is not compared)."""
    if engine == "torch-chunked":
        force_chunked(monkeypatch)
    layout = GroupLayout.from_lengths([4, 3], [[3, 3, 1], [2, 5]])
    token = 8 if where == "completion" else 12
    features = resolve(FEATURES[feature], layout, 4)
    q, k, v = (x.detach() for x in make_inputs(layout, 4, 2, 8, torch.Generator().manual_seed(7)))
    run = backend("reference" if engine == "reference" else "torch", layout)
    clean = with_grads(run, *(x.clone().requires_grad_() for x in (q, k, v)), features)
    k[token, 1], v[token, 0] = float("nan"), float("inf")
    poisoned = with_grads(run, *(x.clone().requires_grad_() for x in (q, k, v)), features)
    if layout.token_completion[token] >= 0:
        rows = layout.token_completion == layout.token_completion[token]
    else:
        rows = layout.token_group == layout.token_group[token]
    keys = prefix_sharing_mask(layout)[rows].any(0)
    assert not poisoned[0][rows].isfinite().all()
    for name, a, e in zip(NAMES[:5], poisoned, clean):
        unaffected = ~keys if name in ("dk", "dv") else ~rows
        assert torch.equal(a[unaffected], e[unaffected]), name


# ---------------------------------------------------------------------------- validation
@pytest.fixture
def small():
    layout = GroupLayout.from_lengths([3], [[2, 1]])
    g = torch.Generator().manual_seed(0)
    return layout, *(torch.randn(6, heads, 8, generator=g) for heads in (4, 2, 2))


@pytest.mark.parametrize("window,error,message", [
    (0, ValueError, r"window must be an integer >= 1, got 0"),
    (-3, ValueError, r"window must be an integer >= 1, got -3"),
    (True, TypeError, r"window must be an integer, got bool"),
    (2.0, TypeError, r"window must be an integer, got float"),
    (torch.tensor(2), TypeError, r"window must be an integer, got Tensor"),
])
def test_error_window(small, window, error, message):
    layout, q, k, v = small
    with pytest.raises(error, match=message):
        prefix_attention(q, k, v, layout, window=window)


@pytest.mark.parametrize("softcap,error,message", [
    (0.0, ValueError, r"softcap must be a positive finite number, got 0.0"),
    (-1.0, ValueError, r"softcap must be a positive finite number, got -1.0"),
    (float("inf"), ValueError, r"softcap must be a positive finite number, got inf"),
    (float("nan"), ValueError, r"softcap must be a real number, got nan"),
    (True, TypeError, r"softcap must be a real number, got bool"),
    ("30", TypeError, r"softcap must be a real number, got str"),
    (1e-50, ValueError, r"softcap must be in \[.*\] \(finite and nonzero in float32"),
])
def test_error_softcap(small, softcap, error, message):
    layout, q, k, v = small
    with pytest.raises(error, match=message):
        prefix_attention(q, k, v, layout, softcap=softcap)


def test_error_sinks(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match=r"sinks must be a torch.Tensor of shape \[Hq\] = \[4\] or None, got list"):
        prefix_attention(q, k, v, layout, sinks=[0.0] * 4)
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\] = \[4\] .*got \(2,\)"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(2))  # Hkv, not Hq
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\] = \[4\] .*got \(1, 4\)"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"sinks must have a floating-point dtype, got torch.int64"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sinks is on meta but q is on cpu"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(4, device="meta"))


def test_softmax_scale_is_keyword_only(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match="positional"):
        prefix_attention(q, k, v, layout, 0.3)
