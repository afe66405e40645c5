"""prefix_attention on every registered backend against the one float64 per-sequence oracle.

The matrix: every way of running every backend of ``backend_names("prefix_attention")`` here
(``attention_oracle.HOW_TO_RUN``) x the layouts of ``attention_oracle.CASES`` (one-level,
ragged, GQA, a random tree, a system prompt shared across groups, a deep chain) x the features
(plain, a window per layout (1 on the ragged one), softcap, sinks, all three): outputs, lse and the gradients of q, k, v
and sinks of a random linear loss on out and lse. Then the same oracle, generic over the
backends, for the paths the matrix does not take (a loss on one output, degenerate layouts,
more random trees, lower precision, sinks of another dtype, NaN/inf containment), and checks
of the oracle itself. Tolerances: ``attention_oracle.Run.tol`` (float64: 1e-10 of each
tensor's largest entry; the Triton interpreter's float32: 1e-4, justified there).
"""
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from attention_oracle import (
    CASES, F64, FEATURES, GPU, assert_all_close, backend_runs, make_inputs, masked_attention, oracle,
    per_sequence_attention, random_tree_sequences, skip_unless_runs,
)
from attention_oracle import outputs_and_grads

from prefix_grouper import GroupLayout, available_backends, prefix_attention
from prefix_grouper.attention import prefix_sharing_mask
from prefix_grouper.unpacked import unpacked_prefix_attention

RUNS = backend_runs()


def split_features(features):
    features = dict(features)
    return features, features.pop("sinks", False)


@functools.lru_cache(maxsize=None)
def case_oracle(case_name, feature):
    """The layout, inputs and float64 oracle of one cell of the matrix (shared by every backend)."""
    case = CASES[case_name]
    layout = case.build("cpu")
    hq, hkv, d = case.heads
    features, with_sinks = split_features(FEATURES[feature](case))
    leaves, cotangents = make_inputs(layout, hq, hkv, d, seed=len(case_name), sinks=with_sinks)
    scale = d ** -0.5
    return layout, leaves, cotangents, features, scale, oracle(layout, leaves, cotangents, features, scale)


def run_against_oracle(run, layout, build, leaves, cotangents, features, scale, expected, **loss):
    device_layout = layout if run.device == "cpu" else build(run.device)
    with run.context():
        actual = outputs_and_grads(run.attention(device_layout, softmax_scale=scale, **features), leaves, cotangents,
                                   dtype=run.dtype, device=run.device, **loss)
    assert_all_close(actual, expected, run.tol)


# ---------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_matches_per_sequence_oracle(run, case, feature):
    skip_unless_runs(run)
    layout, leaves, cotangents, features, scale, expected = case_oracle(case, feature)
    run_against_oracle(run, layout, CASES[case].build, leaves, cotangents, features, scale, expected)


def test_matrix_cases_are_what_they_say():
    """The matrix's layouts: one level, empty completions, GQA, depth >= 3 trees, one shared root."""
    one_level, ragged, gqa = (CASES[name].build("cpu") for name in ("one-level", "ragged", "gqa"))
    assert one_level.is_flat and ragged.is_flat and gqa.is_flat
    assert 0 in ragged.suffix_lens_list and 1 in ragged.prefix_lens_list
    assert CASES["gqa"].heads[0] > CASES["gqa"].heads[1]
    tree = CASES["tree"].build("cpu")
    assert not tree.is_flat and max(len(tree.key_runs(s)) for s in range(len(tree.segments))) >= 5
    sequences = [tuple(tree.sequence_positions(i).tolist()) for i in range(tree.num_sequences)]
    assert len(set(sequences)) < len(sequences)  # exact duplicates
    chain = CASES["chain"].build("cpu")
    assert max(len(chain.key_runs(s)) for s in range(len(chain.segments))) >= 6
    assert len(CASES["shared-across-groups"].build("cpu").segmentation.groups) == 1


# ---------------------------------------------------------------------------- paths the matrix does not take
@pytest.mark.parametrize("case, loss, feature", [("ragged", "out-only", "plain"), ("tree", "out-only", "all"),
                                                 ("ragged", "lse-only", "all"), ("tree", "lse-only", "plain")])
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_loss_on_one_output(run, case, loss, feature):
    """out alone without ``return_lse`` (the torch backend's fused path; an unused lse whose
    gradient arrives as None), and a loss on the lse alone (flash's LSE-gradient run)."""
    skip_unless_runs(run)
    layout, leaves, cotangents, features, scale, _ = case_oracle(case, feature)
    loss_kwargs = {"out_only": True} if loss == "out-only" else {"lse_only": True}
    expected = oracle(layout, leaves, cotangents, features, scale, **loss_kwargs)
    device_layout = layout if run.device == "cpu" else CASES[case].build(run.device)
    if loss == "out-only":
        def attention(q, k, v, sinks=None):
            out = prefix_attention(q, k, v, device_layout, backend=run.backend, softmax_scale=scale, sinks=sinks,
                                   **features)
            return out, out.new_zeros(out.shape[:2])
    else:
        attention = run.attention(device_layout, softmax_scale=scale, **features)
    with run.context():
        actual = outputs_and_grads(attention, leaves, cotangents, dtype=run.dtype, device=run.device, **loss_kwargs)
    if loss == "out-only":  # the placeholder lse
        actual[1], expected[1] = actual[1][:0], expected[1][:0]
    assert_all_close(actual, expected, run.tol)


EDGE_LAYOUTS = {  # name: (sequences or lengths, heads, features)
    "single-token": (lambda: GroupLayout.from_sequences([[5]]), (2, 2, 3), {"sinks": True}),
    "all-duplicates": (lambda: GroupLayout.from_sequences([[1, 2, 3]] * 3), (2, 1, 3), {"window": 2}),
    "prompts-only": (lambda: GroupLayout.from_lengths([4, 3], [[0, 0], [0]]), (2, 1, 16), {}),
    "one-token-rows": (lambda: GroupLayout.from_lengths([1], [[1]]), (2, 2, 8), {"softcap": 2.0, "sinks": True}),
}


@pytest.mark.parametrize("edge", list(EDGE_LAYOUTS))
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_edge_layouts(run, edge):
    """One sequence of one token, three identical sequences, groups whose completions are all empty."""
    skip_unless_runs(run)
    build, (hq, hkv, d), features = EDGE_LAYOUTS[edge]
    layout = build()
    features, with_sinks = split_features(features)
    leaves, cotangents = make_inputs(layout, hq, hkv, d, seed=3, sinks=with_sinks)
    expected = oracle(layout, leaves, cotangents, features, d ** -0.5)
    run_against_oracle(run, layout, lambda device: build(), leaves, cotangents, features, d ** -0.5, expected)


@pytest.mark.parametrize("seed, feature", [(2, "all"), (3, "plain"), (14, "all"), (14, "plain")])
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_random_trees(run, seed, feature):
    """More trees of random depth and fan-out (duplicates, prefixes of others, merged tokens)."""
    skip_unless_runs(run)
    build = lambda device: GroupLayout.from_sequences(random_tree_sequences(seed), device=device)  # noqa: E731
    layout = build("cpu")
    features, with_sinks = split_features({"window": 3, "softcap": 2.0, "sinks": True} if feature == "all" else {})
    leaves, cotangents = make_inputs(layout, 6, 2, 7, seed=seed, sinks=with_sinks)
    expected = oracle(layout, leaves, cotangents, features, 7 ** -0.5)
    run_against_oracle(run, layout, build, leaves, cotangents, features, 7 ** -0.5, expected)


@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_saturated_softcap(run):
    """Scores of magnitude ~40 under a softcap of 4: tanh near +-1, where its derivative (the
    gradients' factor) is tiny, and near 0 elsewhere; with sinks."""
    skip_unless_runs(run)
    case = CASES["ragged"]
    layout = case.build("cpu")
    leaves, cotangents = make_inputs(layout, 2, 1, 16, seed=4, sinks=True, score_size=100.0)
    features = {"softcap": 4.0}
    expected = oracle(layout, leaves, cotangents, features, 0.25)
    run_against_oracle(run, layout, case.build, leaves, cotangents, features, 0.25, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_lower_precision(run, dtype):
    """Inputs (and sinks) of a lower precision are computed in float32 and rounded once.
    float32: every output and gradient within 2e-5 relative RMS of float64 (float32 rounding
    accumulated over <= 20 keys, ~1e-6); half: the output within two of its ulps at 1 (the
    rounding of an O(1) value), the lse (float32) within 1e-5 relative."""
    skip_unless_runs(run, dtype)
    if dtype == run.dtype:
        pytest.skip("the matrix runs this backend in this dtype")
    layout = GroupLayout.from_lengths([9, 5], [[3, 1], [4]])
    (q, k, v, sinks), cotangents = make_inputs(layout, 4, 2, 16, seed=8, sinks=True, score_size=1.0)
    q, k, v, sinks = (x.to(dtype) for x in (q, k, v, sinks))  # the oracle sees the rounded inputs
    features = {"window": 4, "softcap": 2.0}
    expected = oracle(layout, (q, k, v, sinks), cotangents, features, 0.25)
    device_layout = GroupLayout.from_lengths([9, 5], [[3, 1], [4]], device=run.device)
    with run.context():
        actual = outputs_and_grads(run.attention(device_layout, softmax_scale=0.25, **features),
                                   (q, k, v, sinks), cotangents, device=run.device)
    out, lse = actual[:2]
    assert out.dtype == dtype and lse.dtype == torch.float32
    if dtype == torch.float32:
        for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), actual, expected):
            assert a.dtype == torch.float32, name
            a, e = a.double(), e.double()
            assert ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()).item() < 2e-5, name
    else:
        assert (out.double().cpu() - expected[0]).abs().max().item() <= 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(lse.double().cpu(), expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_sinks_of_another_dtype(run, sinks_dtype):
    """Sinks may have any float dtype: used in the compute dtype, their gradient in their own."""
    skip_unless_runs(run)
    layout = GroupLayout.from_lengths([7, 33], [[5, 1], [40]])
    (q, k, v, _), _ = make_inputs(layout, 4, 2, 8, seed=4, score_size=1.0)
    sinks = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=sinks_dtype)
    device_layout = layout if run.device == "cpu" else GroupLayout.from_lengths([7, 33], [[5, 1], [40]],
                                                                                device=run.device)
    leaves = [x.to(run.device, run.dtype).requires_grad_() for x in (q, k, v)]
    sink_leaf = sinks.to(run.device).requires_grad_()
    with run.context():
        out = prefix_attention(*leaves, device_layout, sinks=sink_leaf, backend=run.backend)
        (grad,) = torch.autograd.grad(out.sum(), sink_leaf)
    assert out.dtype == run.dtype and grad.dtype == sinks_dtype and grad.shape == (4,)
    expected = per_sequence_attention(q, k, v, layout, softmax_scale=8 ** -0.5, sinks=sinks.double())[0]
    assert_all_close([out.cpu()], [expected], run.tol)


@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_window_covering_every_row_is_no_window(run):
    """A window of at least the longest row hides nothing: bit for bit the plain computation;
    one less changes the result."""
    skip_unless_runs(run)
    layout = CASES["ragged"].build(run.device)
    longest = int(layout.position_ids.max()) + 1
    assert longest == 39
    (q, k, v, _), _ = make_inputs(layout, 2, 1, 16, seed=3)
    q, k, v = (x.to(run.device, run.dtype) for x in (q, k, v))
    with run.context():
        plain = prefix_attention(q, k, v, layout, backend=run.backend, return_lse=True)
        for window in (longest, 10**6):
            for a, b in zip(prefix_attention(q, k, v, layout, backend=run.backend, return_lse=True, window=window),
                            plain):
                assert torch.equal(a, b), window
        shorter = prefix_attention(q, k, v, layout, backend=run.backend, window=longest - 1)
    assert not torch.equal(shorter, plain[0])


@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_non_contiguous_inputs(run):
    """Strided views: a head stride of 2D, head-major storage, a last-dim stride of 2."""
    skip_unless_runs(run)
    layout = CASES["ragged"].build("cpu")
    t, d = layout.total_tokens, 16
    (q0, k0, v0, _), cotangents = make_inputs(layout, 4, 2, 2 * d, seed=3)
    q0, k0, v0 = (x.to(run.device, run.dtype) for x in (q0, k0, v0))
    q = q0[..., :d]
    k = k0.transpose(0, 1).contiguous().transpose(0, 1)[..., d:]
    v = v0[..., ::2]
    assert not any(x.is_contiguous() for x in (q, k, v)) and q.shape == (t, 4, d)
    device_layout = layout if run.device == "cpu" else CASES["ragged"].build(run.device)
    with run.context():
        out, lse = prefix_attention(q, k, v, device_layout, backend=run.backend, return_lse=True)
    want = per_sequence_attention(*(x.double().cpu() for x in (q, k, v)), layout, softmax_scale=d ** -0.5)
    assert_all_close([out.cpu(), lse.cpu()], list(want), run.tol)


# ---------------------------------------------------------------------------- NaN/inf containment
def poisoned_rows_and_keys(layout, token):
    """Rows a NaN/inf in K/V of ``token`` may reach: those of its segment's subtree (a
    completion token: its completion's rows; a prompt token: its group's rows, which still
    multiply it by a zero probability inside their segment's block); and the keys whose
    gradients those rows may reach: every key they see."""
    mask = prefix_sharing_mask(layout)
    first = layout.segments[int(layout.token_segment[token])].start
    rows = mask[:, first]
    return rows, mask[rows].any(0)


def _two_groups(device="cpu"):
    return GroupLayout.from_lengths([4, 3], [[3, 3, 1], [2, 5]], device=device)


NON_FINITE = {  # name: (layout on a device, poisoned token)
    "completion": (_two_groups, 8),  # group 0's second completion
    "prefix": (_two_groups, 12),  # group 1's prompt
    "tree": (lambda device="cpu": GroupLayout.from_sequences(random_tree_sequences(2), device=device), 6),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaNs
@pytest.mark.parametrize("where, feature", [("completion", "plain"), ("prefix", "all"), ("tree", "plain"),
                                            ("tree", "all")])
@pytest.mark.parametrize("run", RUNS)
def test_prefix_attention_non_finite_kv_stays_in_its_subtree(run, where, feature):
    """A NaN in one token's K and an inf in its V reach every row that sees it and no row
    outside its segment's subtree; every other row's output and q gradient, and every other
    key's k/v gradients, are bitwise those of a clean batch (the sinks' gradient sums every
    row, so it is not compared). Ragged lengths make every padded batch pad."""
    skip_unless_runs(run)
    build, token = NON_FINITE[where]
    layout = build()
    features, with_sinks = split_features({"window": 3, "softcap": 2.0, "sinks": True} if feature == "all" else {})
    (q, k, v, sinks), cotangents = make_inputs(layout, 4, 2, 8, seed=7, sinks=with_sinks)
    rows, keys = poisoned_rows_and_keys(layout, token)
    assert 0 < int(rows.sum()) < layout.total_tokens
    attention = run.attention(build(run.device), **features)
    with run.context():
        clean = outputs_and_grads(attention, (q, k, v, sinks), cotangents, dtype=run.dtype, device=run.device)
        k, v = k.clone(), v.clone()
        k[token, 1], v[token, 0] = float("nan"), float("inf")
        poisoned = outputs_and_grads(attention, (q, k, v, sinks), cotangents, dtype=run.dtype, device=run.device)
    seen = prefix_sharing_mask(layout, features.get("window"))[:, token]
    assert not poisoned[0][seen].reshape(int(seen.sum()), -1).isfinite().all(dim=1).any()
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean):
        unaffected = ~keys if name in ("dk", "dv") else ~rows
        assert torch.equal(a[unaffected], e[unaffected]), name


# ---------------------------------------------------------------------------- the oracle and the mask
def test_oracle_features_change_the_result():
    """The matrix can fail: every feature moves the oracle's outputs well beyond the tolerance,
    and the reference backend agrees a window of the longest row is bitwise no window."""
    layout = CASES["ragged"].build("cpu")
    (q, k, v, sinks), _ = make_inputs(layout, 2, 2, 16, seed=0, sinks=True)
    plain = per_sequence_attention(q, k, v, layout, softmax_scale=0.25)[0]
    for features in ({"window": 1}, {"window": 5}, {"window": 38}, {"softcap": 2.0}, {"sinks": sinks},
                     {"sinks": sinks - 3}):
        changed = per_sequence_attention(q, k, v, layout, softmax_scale=0.25, **features)[0]
        assert (changed - plain).abs().max() > 1e-6, features
    reference = prefix_attention(q, k, v, layout, backend="reference", softmax_scale=0.25)
    assert torch.equal(prefix_attention(q, k, v, layout, backend="reference", softmax_scale=0.25, window=39), reference)


def test_oracle_matches_dense_masked_attention_and_sdpa():
    """The per-sequence oracle equals one dense product under ``prefix_sharing_mask`` (written
    independently from the segmentation) and, for a prompt, PyTorch's causal SDPA."""
    layout = CASES["tree"].build("cpu")
    (q, k, v, sinks), _ = make_inputs(layout, 4, 2, 8, seed=1, sinks=True)
    for window in (None, 4):
        want = per_sequence_attention(q, k, v, layout, softmax_scale=0.3, window=window, softcap=2.0, sinks=sinks)
        got = masked_attention(q, k, v, prefix_sharing_mask(layout, window), 0.3, softcap=2.0, sinks=sinks)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    layout = GroupLayout.from_lengths([9], [[4, 2]])
    (q, k, v, _), _ = make_inputs(layout, 2, 2, 8, seed=2)
    out = per_sequence_attention(q, k, v, layout, softmax_scale=8 ** -0.5)[0]
    causal = F.scaled_dot_product_attention(*(x[:9].transpose(0, 1) for x in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out[:9], causal.transpose(0, 1), rtol=1e-12, atol=1e-12)


def test_prefix_sharing_mask_is_ancestors_and_causal_self():
    """prefix_sharing_mask on a tree: key k is visible from q iff k's segment is q's or an
    ancestor of it and k comes first, brute-forced from the sequences."""
    layout = GroupLayout.from_sequences(random_tree_sequences(11))
    expected = torch.zeros(layout.total_tokens, layout.total_tokens, dtype=torch.bool)
    for i in range(layout.num_sequences):
        rows = layout.sequence_positions(i)
        expected[rows[:, None], rows[None, :]] |= torch.ones(len(rows), len(rows), dtype=torch.bool).tril()
    assert torch.equal(prefix_sharing_mask(layout), expected)


@pytest.mark.parametrize("window", [1, 2, 5, 7, 9, 12, 100])
def test_prefix_sharing_mask_window_matches_transformers(window):
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


# ---------------------------------------------------------------------------- other baselines and layouts
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_prefix_attention_equals_unpacked_rows(backend, generator):
    """Each [prefix; suffix_i] run on its own through causal SDPA (prefix_grouper.unpacked)
    gives the same completion outputs, and the same q/k/v gradients once the G prefix
    copies' gradients are summed. Float64 on both sides: only the summation order differs."""
    layout = GroupLayout.from_lengths([7, 1, 20], [[1, 7, 3], [5], [2, 9]])
    q, k, v = (torch.randn(layout.total_tokens, h, 8, generator=generator, dtype=F64, requires_grad=True)
               for h in (4, 2, 2))
    w = torch.randn(layout.total_tokens, 4, 8, generator=generator, dtype=F64)
    completion = layout.token_completion >= 0
    out = prefix_attention(q, k, v, layout, backend=backend)
    expected = unpacked_prefix_attention(q, k, v, layout)
    grads = torch.autograd.grad((out * w)[completion].sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w)[completion].sum(), (q, k, v))
    torch.testing.assert_close(out[completion], expected[completion], rtol=1e-10, atol=1e-10)
    for name, a, e in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("feature", list(FEATURES))
def test_prefix_attention_one_level_layout_built_as_a_tree(feature):
    """The same batch as a one-level layout (from_lengths) and as from_sequences of its rows:
    identical outputs on the torch backend, at every packed token (same packing)."""
    prompts, completions = [[1, 2, 3, 4], [5, 6]], [[[7, 8], [9], [10, 11, 12]], [[13, 14, 15], [16]]]
    one_level = GroupLayout.from_lengths([4, 2], [[2, 1, 3], [3, 1]])
    tree = GroupLayout.from_sequences([p + c for p, cs in zip(prompts, completions) for c in cs])
    assert tree.segments == one_level.segments
    features, with_sinks = split_features(FEATURES[feature](CASES["tree"]))
    (q, k, v, sinks), _ = make_inputs(one_level, 4, 2, 8, seed=1, sinks=with_sinks)
    a = prefix_attention(q, k, v, one_level, sinks=sinks, backend="torch", return_lse=True, **features)
    b = prefix_attention(q, k, v, tree, sinks=sinks, backend="torch", return_lse=True, **features)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- call forms
@pytest.fixture
def small():
    layout = GroupLayout.from_lengths([3], [[2, 1]])
    g = torch.Generator().manual_seed(0)
    return layout, *(torch.randn(6, heads, 8, generator=g) for heads in (4, 2, 2))


def test_prefix_attention_leading_batch_dim(small):
    """The documented [1, T, H, D] form, with and without lse, with and without features."""
    layout, q, k, v = (small[0], *(x.double() for x in small[1:]))
    out = prefix_attention(q[None], k[None], v[None], layout, backend="torch")
    assert out.shape == (1, *q.shape)
    torch.testing.assert_close(out[0], prefix_attention(q, k, v, layout, backend="reference"))
    for features in ({"softmax_scale": 0.3}, {"window": 4, "softcap": 2.0, "sinks": torch.tensor([0.0, 1.0, -1.0, 2.0],
                                                                                                   dtype=F64)}):
        out, lse = prefix_attention(q[None], k[None], v[None], layout, return_lse=True, **features)
        ref, ref_lse = prefix_attention(q, k, v, layout, backend="reference", return_lse=True, **features)
        assert out.shape == (1, *q.shape) and lse.shape == (1, layout.total_tokens, 4)
        torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[0], ref_lse, rtol=1e-10, atol=1e-10)


def test_prefix_attention_scale_accepts_numpy_and_tensor_scalars(small):
    np = pytest.importorskip("numpy")
    layout, q, k, v = small
    expected = prefix_attention(q, k, v, layout, softmax_scale=0.25)
    for scale in (np.float32(0.25), torch.tensor(0.25), 0.25):
        torch.testing.assert_close(prefix_attention(q, k, v, layout, softmax_scale=scale), expected)


def test_prefix_attention_auto_on_cpu_is_torch():
    assert available_backends("cpu")[:2] == ["reference", "torch"]


@pytest.mark.skipif(not GPU, reason="host-sync detection needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefix_attention_no_host_sync_in_forward_and_backward(backend):
    layout = GroupLayout.from_lengths([7, 33], [[5, 1, 0], [17]], device="cuda")
    (q, k, v, _), _ = make_inputs(layout, 4, 2, 64, seed=0, score_size=1.0)
    q, k, v = (x.to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v))
    prefix_attention(q, k, v, layout, backend=backend).sum().backward()  # warm caches/compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = prefix_attention(q, k, v, layout, backend=backend, return_lse=True)
        (out.float().sum() + lse.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
