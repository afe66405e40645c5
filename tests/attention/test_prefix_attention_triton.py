"""The Triton backend's kernels and ops beyond test_prefix_attention.py's matrix: dK/dV chunk
splits, runs over several tiles, the forward's skipped key blocks, bitwise repeatability,
the torch.library ops (schemas, fakes, autograd), eager calls off the library dispatch,
torch.compile across layouts and features, FakeTensor inputs; on a GPU, GPU-sized layouts
in float32 and the bf16 rule against plain bf16 PyTorch.

Without a GPU the kernels run through the Triton interpreter (fp32, tiny shapes, query and
key tiles of 32 rows walked in blocks of 16). Tolerance: ``HOW_TO_RUN["triton"]``'s (1e-4 of
each tensor's largest entry, justified in attention_oracle.py).
"""
from collections import Counter

import pytest
import torch
from attention_oracle import (
    GPU, HOW_TO_RUN, assert_all_close, make_inputs, masked_attention, oracle, outputs_and_grads,
    random_tree_sequences,
)

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import prefix_sharing_mask, triton_backend, triton_fwd
from prefix_grouper.attention.triton_autotune import INTERPRETER_INNER_BLOCK
from prefix_grouper.attention.triton_backend import _tile_sizes, triton_prefix_attention
from prefix_grouper.attention.triton_common import head_packing
from prefix_grouper.attention.triton_schedule import query_tile_rows
from prefix_grouper.runtime import triton_interpreted, triton_unavailable_reason

DEVICE = torch.device("cuda" if GPU else "cpu")
if triton_unavailable_reason(DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {triton_unavailable_reason(DEVICE)}", allow_module_level=True)

TRITON = HOW_TO_RUN["triton"][0]
RAGGED = ([1, 7, 20], [[0, 1, 7], [19], [7, 0, 1, 19]])  # empty completions, G = 3, 1, 4
LONG = ([97, 5], [[1, 40], [33]])  # a prefix spanning several tiles, a partial last tile
# GPU tiles are 32-128 rows: lengths around and across several of them.
GPU_SIZED = ([300, 129], [[0, 257, 1], [128, 500]])
ON_GPU_ONLY = pytest.mark.skipif(not GPU, reason="too slow for the interpreter")


def _layout(lengths, device=DEVICE):
    return GroupLayout.from_lengths(*lengths, device=device)


def _inputs(layout, q_heads, kv_heads, head_dim, dtype=torch.float32, seed=0, with_sinks=False):
    """Unit-scale q, k, v (and sinks) on DEVICE."""
    (q, k, v, sinks), _ = make_inputs(layout, q_heads, kv_heads, head_dim, seed=seed, sinks=with_sinks,
                                      score_size=1.0)
    return [x.to(DEVICE, dtype) for x in (q, k, v, sinks) if x is not None]


def check_against_oracle(build, heads, seed=0, scale=None, **features):
    """The Triton backend against the float64 oracle on the layout ``build(device)``."""
    layout = build("cpu")
    with_sinks = features.pop("sinks", False)
    leaves, cotangents = make_inputs(layout, *heads, seed=seed, sinks=with_sinks, score_size=1.0)
    scale = heads[2] ** -0.5 if scale is None else scale
    expected = oracle(layout, leaves, cotangents, features, scale)
    actual = outputs_and_grads(TRITON.attention(build(DEVICE), softmax_scale=scale, **features), leaves, cotangents,
                               dtype=TRITON.dtype, device=DEVICE)
    assert_all_close(actual, expected, TRITON.tol)
    return actual


# ---------------------------------------------------------------------------- kernels against the oracle
@pytest.mark.parametrize("chunk_rows", [48, 10**6])
def test_prefix_attention_triton_dkdv_chunk_lengths(monkeypatch, chunk_rows):
    """Under the interpreter the host splits every key tile into one-tile chunks; chunks
    spanning the diagonal, whole and partial query blocks (48 rows: 1.5 tiles), and no
    split at all, must be exact too."""
    monkeypatch.setattr(triton_backend, "dkdv_chunk_rows", lambda *args: chunk_rows)
    check_against_oracle(lambda device: _layout(LONG, device), (2, 1, 16), seed=11, scale=0.25)


def _long_run_tree(device):
    """Depth 3, segments of 58, 54 and 11 tokens, one root, distinct tokens (no merging)."""
    return GroupLayout.from_sequences(random_tree_sequences(24, max_run=45, max_depth=3, max_roots=1, max_branch=2,
                                                            vocabulary=10**6), device=device)


@pytest.mark.parametrize("window", [None, 30])
def test_prefix_attention_triton_runs_spanning_several_tiles(window):
    """Ancestor runs and own segments over several 32-token tiles and 16-key blocks, partial
    last blocks, split dK/dV ranges."""
    layout = _long_run_tree("cpu")
    assert not layout.is_flat and sum(segment.length > 32 for segment in layout.segments) >= 2
    check_against_oracle(_long_run_tree, (2, 1, 16), seed=12, window=window)


@pytest.mark.parametrize("lengths, heads, window, softcap, with_sinks", [
    (GPU_SIZED, (4, 2, 64), None, None, False),
    (GPU_SIZED, (4, 2, 64), 200, 20.0, True),
    (GPU_SIZED, (12, 2, 128), 1, None, False),
])
@ON_GPU_ONLY
def test_prefix_attention_triton_gpu_sized_layouts(lengths, heads, window, softcap, with_sinks):
    check_against_oracle(lambda device: _layout(lengths, device), heads, window=window, softcap=softcap,
                         sinks=with_sinks)


def _needed_blocks(layout, mask, tile_tokens, block):
    """Key-block starts a forward program must visit, per query tile: the blocks of its
    runs (the prefix, its own segment up to the tile's end) holding a key it sees."""
    needed = Counter()
    tiles, runs = query_tile_rows(layout.segmentation, tile_tokens)
    for q_start, seg_start, seg_end, runs_begin, runs_end in tiles:
        rows = slice(q_start, min(q_start + tile_tokens, seg_end))
        diag_end = rows.stop
        ancestors = [(start, start + length) for start, length, _ in runs[runs_begin:runs_end]]
        for run_start, run_end in (*ancestors, (seg_start, diag_end)):
            for key_start in range(run_start, run_end, block):
                if mask[rows, key_start:min(key_start + block, run_end)].any():
                    needed[key_start] += 1
    return needed


@pytest.mark.skipif(not triton_interpreted(), reason="counts the interpreter's block visits")
@pytest.mark.parametrize("window", [None, 1, 5, 20, 40])
def test_prefix_attention_triton_forward_visits_only_blocks_inside_the_window(monkeypatch, window):
    """Every key block a forward program folds holds a key one of its rows sees: blocks
    wholly outside the window are skipped, not masked."""
    layout = _layout(LONG)
    q, k, v = _inputs(layout, 2, 2, 16, seed=6)
    visited = Counter()
    fold = triton_fwd.attend_key_block

    def counting_fold(state, ctx, key_start, *args):
        visited[int(key_start)] += 1
        return fold(state, ctx, key_start, *args)

    monkeypatch.setattr(triton_fwd, "attend_key_block", counting_fold)
    triton_prefix_attention(q, k, v, layout, 0.25, window=window)
    packing = head_packing(_tile_sizes(16, torch.float32)[0], 1)
    per_program = _needed_blocks(layout, prefix_sharing_mask(layout, window), packing.tile_tokens,
                                 INTERPRETER_INNER_BLOCK)
    assert visited == Counter({key: count * 2 for key, count in per_program.items()})  # 2 heads
    if window is not None:
        assert sum(visited.values()) < sum(_needed_blocks(layout, prefix_sharing_mask(layout), packing.tile_tokens,
                                                          INTERPRETER_INNER_BLOCK).values()) * 2


# ---------------------------------------------------------------------------- determinism
REPEATABLE = {  # name: (layout, heads, features, sinks dtype)
    # RAGGED's largest group's prefix tile is split in two: split dK/dV partials summed in a fixed order.
    "one-level": (lambda: _layout(RAGGED), (4, 2, 16), {}, None),
    "tree-window": (lambda: GroupLayout.from_sequences(random_tree_sequences(7, max_run=12, max_depth=3,
                                                                             vocabulary=10**6), device=DEVICE),
                    (2, 1, 16), {"window": 11}, None),
    # bf16 sinks with fp32 inputs: the sinks' gradient in their dtype, their reduction repeatable.
    "sinks-bf16": (lambda: _layout(LONG), (4, 2, 16), {"window": 33, "softcap": 5.0}, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(REPEATABLE))
def test_prefix_attention_triton_backward_bitwise_repeatable(case):
    """Two runs of forward and backward agree bit for bit."""
    build, heads, features, sinks_dtype = REPEATABLE[case]
    layout = build()
    tensors = _inputs(layout, *heads, seed=9, with_sinks=sinks_dtype is not None)
    if sinks_dtype is not None:
        tensors[3] = tensors[3].to(sinks_dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(10)
    weight = torch.randn(*tensors[0].shape, generator=gen, device=DEVICE)

    def run():
        leaves = [x.detach().requires_grad_() for x in tensors]
        sinks = leaves[3] if len(leaves) > 3 else None
        out, lse = triton_prefix_attention(*leaves[:3], layout, 0.25, sinks=sinks, **features)
        return [out, lse, *torch.autograd.grad((out * weight).sum(), leaves)]

    first, second = run(), run()
    if sinks_dtype is not None:
        assert first[-1].dtype == sinks_dtype and first[-1].shape == (heads[0],)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- the ops, eager dispatch, compile, fakes
def test_prefix_attention_triton_custom_op_registration():
    layout = _layout(([3, 2], [[2, 0], [1]]))
    q, k, v = _inputs(layout, 2, 1, 16, seed=4)
    host = layout.host_segments  # the one host encoding the ops read
    assert host.device.type == "cpu" and host.tolist() == [[0, 3, -1], [3, 2, 0], [5, 0, 0], [5, 2, -1], [7, 1, 3]]
    fwd = torch.ops.prefix_grouper.prefix_attention_fwd.default
    plain = (None, 0.25, None, None)  # sinks, softmax_scale, window, softcap
    torch.library.opcheck(fwd, (*(x.clone().requires_grad_() for x in (q, k, v)), plain[0], host, *plain[1:]))
    out, lse = fwd(q, k, v, None, host, *plain[1:])
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    dout = torch.randn(out.shape, generator=gen, device=DEVICE)
    dlse = torch.randn(lse.shape, generator=gen, device=DEVICE)
    bwd = torch.ops.prefix_grouper.prefix_attention_bwd.default
    for maybe_dlse in (dlse, None):
        torch.library.opcheck(bwd, (dout, maybe_dlse, q, k, v, None, out, lse, host, *plain[1:]))
    # Lengths that do not describe q's tokens are refused before any kernel launch.
    other = _layout(([3, 2], [[2, 1], [1]]))
    with pytest.raises(ValueError, match="packs T=9"):
        fwd(q, k, v, None, other.host_segments, *plain[1:])
    with pytest.raises(ValueError, match="packs T=9"):  # a flat layout's host_lengths reaches the same cache
        fwd(q, k, v, None, other.host_lengths, *plain[1:])
    with pytest.raises(ValueError, match=r"host_segments must be a non-empty \[S, 3\]"):
        fwd(q, k, v, None, torch.tensor([2, 3, 2, 2, 1, 2, 0]), *plain[1:])


def test_prefix_attention_triton_eager_calls_skip_the_library_dispatch(monkeypatch):
    """Eager calls run the kernels through a plain autograd.Function, never the custom ops
    (whose dispatch costs host time per layer); torch.compile takes the ops (next test)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the torch.library op")

    monkeypatch.setattr(triton_backend, "_prefix_attention_fwd", refuse)
    monkeypatch.setattr(triton_backend, "_prefix_attention_bwd", refuse)
    layout = _layout(RAGGED)
    q, k, v = (x.requires_grad_() for x in _inputs(layout, 4, 2, 16, seed=3))
    out, lse = prefix_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert type(out.grad_fn).__name__ == "_EagerPrefixAttentionBackward"
    (out.sum() + lse.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_prefix_attention_triton_custom_ops_with_features():
    """The ops' schemas, fakes and autograd registrations with sinks, a window and a softcap."""
    layout = GroupLayout.from_lengths([3, 2], [[2, 0], [1]], device=DEVICE)
    q, k, v, sinks = _inputs(layout, 2, 1, 16, seed=7, with_sinks=True)
    host = layout.host_segments
    fwd = torch.ops.prefix_grouper.prefix_attention_fwd.default
    scalars = (0.25, 2, 5.0)  # softmax_scale, window, softcap
    torch.library.opcheck(fwd, (*(x.clone().requires_grad_() for x in (q, k, v, sinks)), host, *scalars))
    out, lse = fwd(q, k, v, sinks, host, *scalars)
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    dout = torch.randn(out.shape, generator=gen, device=DEVICE)
    bwd = torch.ops.prefix_grouper.prefix_attention_bwd.default
    torch.library.opcheck(bwd, (dout, None, q, k, v, sinks, out, lse, host, *scalars))


def test_prefix_attention_triton_torch_compile_fullgraph_across_layouts(monkeypatch):
    """One compiled function serves many layouts: no recompile per layout, no retraced
    schedule builder, schedules built once per layout, results equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    builds = []
    for name in ("query_tile_rows", "key_tile_rows"):
        def counted(*args, _build=getattr(triton_backend, name), _name=name):
            builds.append(_name)
            return _build(*args)
        monkeypatch.setattr(triton_backend, name, counted)

    def loss_fn(q, k, v, layout):
        out, lse = prefix_attention(q, k, v, layout, backend="triton", return_lse=True)
        return (out.float() ** 2).sum() + lse.sum()

    # On CPU, aot_eager still checks the fake and autograd registrations without
    # compiling C++ around interpreted kernels.
    counter = CompileCounterWithBackend("inductor" if DEVICE.type == "cuda" else "aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    # Different numbers of groups, completions and tokens.
    layouts = [([3, 2], [[2, 0], [1]]), ([5], [[4, 9]]), RAGGED, ([2, 33, 4], [[3], [1, 40], [0, 2]])]
    for i, lengths in enumerate(layouts):
        layout = _layout(lengths)
        q, k, v = _inputs(layout, 2, 2, 16, seed=5 + i)
        eager_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        compiled_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        eager_loss = loss_fn(*eager_inputs, layout)
        compiled_loss = compiled(*compiled_inputs, layout)
        torch.testing.assert_close(compiled_loss, eager_loss)
        for a, b in zip(torch.autograd.grad(compiled_loss, compiled_inputs),
                        torch.autograd.grad(eager_loss, eager_inputs)):
            torch.testing.assert_close(a, b)
        # Eager and compiled calls, forward and backward, share one build of each schedule.
        assert builds == ["query_tile_rows", "key_tile_rows"] * (i + 1), builds
    # The first layout compiles a static graph, the second a dynamic one that serves the rest
    # (a single group included: the layout reaches the ops as host_segments [S, 3], S >= 2 on
    # every flat layout, never of a size 0 or 1 that Dynamo would specialize on).
    assert counter.frame_count <= 2, counter.frame_count


def test_prefix_attention_triton_torch_compile_with_features():
    """fullgraph torch.compile through the ops with every feature: same loss and gradients
    as eager, sinks' included."""
    def loss_fn(q, k, v, sinks, layout):
        out, lse = triton_prefix_attention(q, k, v, layout, 0.25, window=5, softcap=3.0, sinks=sinks)
        return (out ** 2).sum() + lse.sum()

    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    layout = GroupLayout.from_lengths(*RAGGED, device=DEVICE)
    tensors = _inputs(layout, 2, 1, 16, seed=9, with_sinks=True)
    _assert_compiled_matches_eager(loss_fn, compiled, tensors, layout)


def _assert_compiled_matches_eager(loss_fn, compiled, tensors, layout):
    """Same loss and gradients of every input, eager and compiled, on fresh leaves."""
    eager_inputs = [x.clone().requires_grad_() for x in tensors]
    compiled_inputs = [x.clone().requires_grad_() for x in tensors]
    eager_loss, compiled_loss = loss_fn(*eager_inputs, layout), compiled(*compiled_inputs, layout)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(torch.autograd.grad(compiled_loss, compiled_inputs), torch.autograd.grad(eager_loss, eager_inputs)):
        torch.testing.assert_close(a, b)


def test_prefix_attention_triton_torch_compile_on_tree_layouts():
    """The ops take a tree as host_segments: fullgraph compile, same loss and gradients as eager."""
    def loss_fn(q, k, v, layout):
        out, lse = prefix_attention(q, k, v, layout, backend="triton", return_lse=True)
        return (out ** 2).sum() + lse.sum()

    compiled = torch.compile(loss_fn, backend="inductor" if DEVICE.type == "cuda" else "aot_eager", fullgraph=True)
    for seed in (12, 13):  # 51 and 25 tokens, depth 3
        layout = GroupLayout.from_sequences(random_tree_sequences(seed, max_run=8, max_depth=3, vocabulary=10**6),
                                            device=DEVICE)
        assert not layout.is_flat
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        inputs = [torch.randn(layout.total_tokens, 2, 16, generator=gen, device=DEVICE) for _ in range(3)]
        _assert_compiled_matches_eager(loss_fn, compiled, inputs, layout)


def test_prefix_attention_triton_fake_tensors_take_the_op_and_its_fake():
    """Outside torch.compile, FakeTensor inputs (shape propagation, memory planning) still
    reach the custom op's fake, never the kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = _layout(RAGGED)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v = (mode.from_tensor(x) for x in _inputs(layout, 4, 2, 16, seed=4))
        out, lse = prefix_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:2] and lse.dtype == torch.float32


def test_prefix_attention_triton_unavailable_reason():
    assert triton_unavailable_reason(DEVICE) is None
    assert "meta" in triton_unavailable_reason(torch.device("meta"))


# ---------------------------------------------------------------------------- bf16 on a GPU
def _bf16_rule(heads, features, seed):
    """bf16 inputs (and sinks): the error of every output and gradient against float64 is at
    most 2x that of plain bf16 PyTorch attention under the same mask (+ 1e-5), and a second
    run is bitwise the same."""
    layout = GroupLayout.from_lengths([300, 1000, 64], [[0, 129, 500, 1], [7, 300], [200] * 8], device=DEVICE)
    q_heads, kv_heads, head_dim = heads
    features = dict(features)
    tensors = _inputs(layout, q_heads, kv_heads, head_dim, dtype=torch.bfloat16, seed=seed,
                      with_sinks=features.pop("sinks", False))
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    cotangents = (torch.randn(*tensors[0].shape, generator=gen, device=DEVICE, dtype=torch.float64),
                  torch.randn(*tensors[0].shape[:2], generator=gen, device=DEVICE, dtype=torch.float64))
    scale = head_dim ** -0.5
    mask = prefix_sharing_mask(layout, features.get("window"))

    def triton_fn(q, k, v, sinks=None):
        return triton_prefix_attention(q, k, v, layout, scale, sinks=sinks, **features)

    def dense_fn(q, k, v, sinks=None):
        return masked_attention(q, k, v, mask, scale, softcap=features.get("softcap"), sinks=sinks,
                                lse_dtype=torch.float32)

    leaves = tensors + [None] * (4 - len(tensors))
    got = outputs_and_grads(triton_fn, leaves, cotangents, device=DEVICE)
    baseline = outputs_and_grads(dense_fn, leaves, cotangents, device=DEVICE)
    want = outputs_and_grads(dense_fn, leaves, cotangents, dtype=torch.float64, device=DEVICE)
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, baseline, want):
        err = (a.double() - w).abs().max().item()
        baseline_err = (b.double() - w).abs().max().item()
        assert err <= 2 * baseline_err + 1e-5, (name, err, baseline_err)
    for a, b in zip(got, outputs_and_grads(triton_fn, leaves, cotangents, device=DEVICE)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not GPU, reason="bf16 kernels need a CUDA GPU")
@pytest.mark.parametrize("heads, features", [
    ((8, 2, 64), {}), ((8, 2, 128), {}),
    ((8, 2, 128), {"window": 256, "sinks": True}), ((8, 2, 64), {"window": 700, "softcap": 30.0, "sinks": True}),
    ((8, 2, 128), {"softcap": 50.0, "sinks": True}),
], ids=["d64", "d128", "d128-window256-sinks", "d64-window700-softcap30-sinks", "d128-softcap50-sinks"])
def test_prefix_attention_triton_bf16_flash_attention_rule(heads, features):
    _bf16_rule(heads, features, seed=6)
