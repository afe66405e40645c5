"""backend="triton" with a sliding window, a logit softcap and attention sinks, against a
dense float64 PyTorch computation written here (mask from the layout's position ids).

Under the interpreter the kernels run fp32 with 32-row tiles walked in blocks of 16, so
windows of 1, 5, 20 and 33 make tiles and blocks straddle the window's edge, in the
prefix run and in a completion's own run, and 100 / 1000 reach past a prompt / everything.
"""
import os
import shutil
from collections import Counter

import torch

if not torch.cuda.is_available() and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402

from prefix_grouper import GroupLayout  # noqa: E402
from prefix_grouper.attention import triton_fwd  # noqa: E402
from prefix_grouper.attention.triton_backend import (  # noqa: E402
    _tile_sizes, key_tile_rows, query_tile_rows, triton_prefix_attention,
)
from prefix_grouper.attention.triton_autotune import INTERPRETER_INNER_BLOCK  # noqa: E402
from prefix_grouper.attention.triton_common import head_packing  # noqa: E402
from prefix_grouper.runtime import triton_interpreted, triton_unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if triton_unavailable_reason(DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {triton_unavailable_reason(DEVICE)}", allow_module_level=True)

# fp32 kernels against float64, as in test_prefix_attention_triton.py: rounding stays
# around 1e-6 (observed <= 2e-6 here, softcap's tanh included); a key wrongly shown or hidden
# by the window, a missing tanh' factor or a sink left out of the lse moves values by O(0.1).
FP32_ATOL = 1e-4

RAGGED = ([1, 7, 20], [[0, 1, 7], [19], [7, 0, 1, 19]])  # empty completions, G = 3, 1, 4
LONG = ([97, 5], [[1, 40], [33]])  # a prefix of several tiles, completions behind it
SINGLE = ([7], [[97]])  # G = 1, a completion longer than three tiles
# GPU tiles are 32-128 rows: lengths around and across several of them.
GPU_SIZED = ([300, 129], [[0, 257, 1], [128, 500]])
ON_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="too slow for the interpreter")


def _visible(layout, window=None):
    """``[T, T]`` bool, query (row) sees key (column): same group, key a prefix token or in the
    query's own completion, ``pos(q) - window < pos(k) <= pos(q)``."""
    pos, group, segment = layout.position_ids, layout.token_group, layout.token_segment
    key_is_prefix = (layout.token_completion < 0)[None, :]
    mask = ((group[:, None] == group[None, :]) & (pos[None, :] <= pos[:, None])
            & (key_is_prefix | (segment[:, None] == segment[None, :])))
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def dense_attention(q, k, v, layout, scale, window=None, softcap=None, sinks=None):
    """``(out [T, Hq, D], lse [T, Hq])`` in the inputs' dtype: scores, softcap, mask, then a
    softmax over the visible keys and the head's sink logit (which has no value)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~_visible(layout, window), float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None, None].expand(-1, scores.shape[1], 1)], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])[..., :q.shape[0]]
    return torch.einsum("hqk,khd->qhd", probs, v), lse.transpose(0, 1)


def _inputs(layout, q_heads, kv_heads, head_dim, with_sinks, seed, q_scale=1.0, dtype=torch.float32):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    t = layout.total_tokens

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)

    tensors = [randn(t, q_heads, head_dim) * q_scale, randn(t, kv_heads, head_dim), randn(t, kv_heads, head_dim)]
    return tensors + ([randn(q_heads)] if with_sinks else [])


def _outputs_and_grads(fn, tensors, weights, dtype):
    """``[out, lse, dq, dk, dv(, dsinks)]`` of ``sum(out * w_out) + sum(lse * w_lse)``."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in tensors]
    out, lse = fn(*leaves)
    loss = (out.double() * weights[0]).sum() + (lse.double() * weights[1]).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)]


def max_errors(lengths, q_heads, kv_heads, head_dim, window=None, softcap=None, with_sinks=False,
               seed=0, q_scale=1.0):
    """Max abs error of each of out, lse, dq, dk, dv (and dsinks) vs float64."""
    layout = GroupLayout.from_lengths(*lengths, device=DEVICE)
    tensors = _inputs(layout, q_heads, kv_heads, head_dim, with_sinks, seed, q_scale)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    weights = [torch.randn(*tensors[0].shape, generator=gen, device=DEVICE, dtype=torch.float64),
               torch.randn(*tensors[0].shape[:2], generator=gen, device=DEVICE, dtype=torch.float64)]
    scale = head_dim ** -0.5

    def call(backend):
        return lambda q, k, v, sinks=None: backend(q, k, v, layout, scale, window=window, softcap=softcap,
                                                   sinks=sinks)

    got = _outputs_and_grads(call(triton_prefix_attention), tensors, weights, torch.float32)
    want = _outputs_and_grads(call(dense_attention), tensors, weights, torch.float64)
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    return {name: (a.double() - b).abs().max().item() for name, a, b in zip(names, got, want)}


@pytest.mark.parametrize("lengths, q_heads, kv_heads, head_dim, window, softcap, with_sinks", [
    (RAGGED, 2, 2, 16, 1, None, False),     # each token sees only itself
    (RAGGED, 4, 2, 16, 5, None, False),     # GQA, a window shorter than most prompts
    (LONG, 4, 2, 16, 20, None, False),      # completions see the end of a 97-token prompt
    (LONG, 2, 1, 24, 33, None, False),      # just over a tile; head dim padded to 32
    (LONG, 7, 1, 16, 17, None, False),      # 7 heads packed per program, 4-token tiles
    (SINGLE, 1, 1, 16, 50, None, False),    # G = 1, a window inside a long completion
    (LONG, 4, 2, 16, 100, None, False),     # longer than the prompt, not the longest row
    (RAGGED, 3, 1, 16, 1000, None, False),  # longer than every row: equals no window
    (RAGGED, 2, 1, 16, None, 1.5, False),   # a tight softcap (scores up to ~5 before it)
    (LONG, 4, 2, 16, None, 30.0, False),
    (RAGGED, 4, 2, 16, None, None, True),
    (LONG, 3, 3, 16, None, None, True),
    (LONG, 4, 2, 16, 33, 3.0, True),        # everything at once
    (RAGGED, 2, 1, 16, 1, 2.0, True),       # a row may see one key and its sink only
    (SINGLE, 2, 2, 16, 20, None, True),
    pytest.param(GPU_SIZED, 4, 2, 64, 200, 20.0, True, marks=ON_GPU_ONLY),
    pytest.param(GPU_SIZED, 12, 2, 128, 1, None, False, marks=ON_GPU_ONLY),
])
def test_features_match_dense_float64(lengths, q_heads, kv_heads, head_dim, window, softcap, with_sinks):
    errors = max_errors(lengths, q_heads, kv_heads, head_dim, window, softcap, with_sinks)
    assert max(errors.values()) <= FP32_ATOL, errors


def test_softcap_saturated_scores():
    """Scores of magnitude ~40 under a softcap of 4: tanh near +-1, where its derivative
    (the gradients' factor) is tiny, and a near-0 argument elsewhere."""
    errors = max_errors(RAGGED, 2, 1, 16, softcap=4.0, with_sinks=True, q_scale=10.0)
    assert max(errors.values()) <= FP32_ATOL, errors


def test_window_covering_every_row_is_no_window():
    """A window at least the longest row (20 + 19 tokens here) hides nothing: the kernels
    then take the plain path, bit for bit."""
    layout = GroupLayout.from_lengths(*RAGGED, device=DEVICE)
    longest = int(layout.position_ids.max()) + 1
    assert longest == 39
    q, k, v = _inputs(layout, 2, 1, 16, False, seed=3)
    plain = triton_prefix_attention(q, k, v, layout, 0.25)
    for window in (longest, 10**6):
        for a, b in zip(triton_prefix_attention(q, k, v, layout, 0.25, window=window), plain):
            assert torch.equal(a, b)
    shorter = triton_prefix_attention(q, k, v, layout, 0.25, window=longest - 1)[0]
    assert not torch.equal(shorter, plain[0])


def test_sink_gradient_dtype_and_determinism():
    """The sinks' gradient comes back in the sinks' dtype; the whole backward (split dK/dV
    partials, the sinks' reduction) repeats bit for bit."""
    layout = GroupLayout.from_lengths(*LONG, device=DEVICE)
    q, k, v, sinks = _inputs(layout, 4, 2, 16, True, seed=4)
    sinks = sinks.to(torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    weight = torch.randn(*q.shape, generator=gen, device=DEVICE)

    def run():
        leaves = [x.detach().requires_grad_() for x in (q, k, v, sinks)]
        out, _ = triton_prefix_attention(*leaves[:3], layout, 0.25, window=33, softcap=5.0, sinks=leaves[3])
        return torch.autograd.grad((out * weight).sum(), leaves)

    first, second = run(), run()
    assert first[3].dtype == torch.bfloat16 and first[3].shape == (4,)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lengths", [LONG, RAGGED, ([9, 40], [[40, 3, 0], [1, 70]])])
@pytest.mark.parametrize("window", [1, 7, 16, 33, 60])
def test_windowed_key_schedule_lists_exactly_the_visible_pairs(lengths, window):
    """dK/dV programs cover each visible (query, key) pair once and only chunks whose
    queries see a key of their tile, so a window removes work instead of masking it."""
    layout = GroupLayout.from_lengths(*lengths)
    mask = _visible(layout, window)
    tile = 8
    for chunk_rows in (tile, 3 * tile, 10**6):
        programs, split = key_tile_rows(layout.segmentation, tile, chunk_rows, window)
        covered = torch.zeros(mask.shape, dtype=torch.long)
        for k_start, k_end, chunk_start, chunk_end, _, pos_shift in programs:
            keys = torch.arange(k_start, min(k_start + tile, k_end))
            rows = torch.arange(chunk_start, chunk_end)
            # The kernel's masks: causal on packed indices, window through pos_shift.
            seen = (rows[:, None] >= keys[None, :]) & (rows[:, None] < keys[None, :] + window - pos_shift)
            assert seen.any(dim=1).all(), "a chunk row that sees no key of its tile"
            covered[rows[:, None], keys[None, :]] += seen.long()
        assert torch.equal(covered, mask.long())
        plain_rows = sum(p.chunk_end - p.chunk_start
                         for p in key_tile_rows(layout.segmentation, tile, chunk_rows)[0])
        windowed_rows = sum(p.chunk_end - p.chunk_start for p in programs)
        assert windowed_rows < plain_rows if window <= 16 else windowed_rows <= plain_rows
        assert sorted(p.partial_slot for p in programs if p.partial_slot >= 0) == list(
            range(sum(s.num_slots for s in split)))


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
def test_forward_visits_only_blocks_inside_the_window(monkeypatch, window):
    """Every key block a forward program folds holds a key one of its rows sees: blocks
    wholly outside the window are skipped, not masked."""
    layout = GroupLayout.from_lengths(*LONG, device=DEVICE)
    q, k, v = _inputs(layout, 2, 2, 16, False, seed=6)
    visited = Counter()
    fold = triton_fwd.attend_key_block

    def counting_fold(state, ctx, key_start, *args):
        visited[int(key_start)] += 1
        return fold(state, ctx, key_start, *args)

    monkeypatch.setattr(triton_fwd, "attend_key_block", counting_fold)
    triton_prefix_attention(q, k, v, layout, 0.25, window=window)
    packing = head_packing(_tile_sizes(16, torch.float32)[0], 1)
    per_program = _needed_blocks(layout, _visible(layout, window), packing.tile_tokens, INTERPRETER_INNER_BLOCK)
    assert visited == Counter({key: count * 2 for key, count in per_program.items()})  # 2 heads
    if window is not None:
        assert sum(visited.values()) < sum(_needed_blocks(layout, _visible(layout), packing.tile_tokens,
                                                          INTERPRETER_INNER_BLOCK).values()) * 2


def test_custom_ops_with_features():
    """The ops' schemas, fakes and autograd registrations with sinks, a window and a softcap."""
    layout = GroupLayout.from_lengths([3, 2], [[2, 0], [1]], device=DEVICE)
    q, k, v, sinks = _inputs(layout, 2, 1, 16, True, seed=7)
    host = layout.host_lengths
    fwd = torch.ops.prefix_grouper.prefix_attention_fwd.default
    scalars = (0.25, 2, 5.0)  # softmax_scale, window, softcap
    torch.library.opcheck(fwd, (*(x.clone().requires_grad_() for x in (q, k, v, sinks)), host, *scalars))
    out, lse = fwd(q, k, v, sinks, host, *scalars)
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    dout = torch.randn(out.shape, generator=gen, device=DEVICE)
    bwd = torch.ops.prefix_grouper.prefix_attention_bwd.default
    torch.library.opcheck(bwd, (dout, None, q, k, v, sinks, out, lse, host, *scalars))


def test_torch_compile_with_features():
    """fullgraph torch.compile through the ops with every feature: same loss and gradients
    as eager, sinks' included."""
    def loss_fn(q, k, v, sinks, layout):
        out, lse = triton_prefix_attention(q, k, v, layout, 0.25, window=5, softcap=3.0, sinks=sinks)
        return (out ** 2).sum() + lse.sum()

    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    layout = GroupLayout.from_lengths(*RAGGED, device=DEVICE)
    tensors = _inputs(layout, 2, 1, 16, True, seed=9)
    eager_inputs = [x.clone().requires_grad_() for x in tensors]
    compiled_inputs = [x.clone().requires_grad_() for x in tensors]
    eager_loss, compiled_loss = loss_fn(*eager_inputs, layout), compiled(*compiled_inputs, layout)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(torch.autograd.grad(compiled_loss, compiled_inputs), torch.autograd.grad(eager_loss, eager_inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a CUDA GPU")
@pytest.mark.parametrize("head_dim, window, softcap", [(128, 256, None), (64, 700, 30.0), (128, None, 50.0)])
def test_bf16_flash_attention_rule_with_features(head_dim, window, softcap):
    """bf16 with bf16 sinks: error vs float64 <= 2x that of the same dense computation in
    plain bf16 PyTorch (+ eps), for every output and gradient."""
    layout = GroupLayout.from_lengths([300, 1000, 64], [[0, 129, 500, 1], [7, 300], [200] * 8], device=DEVICE)
    tensors = _inputs(layout, 8, 2, head_dim, True, seed=10, dtype=torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    weights = [torch.randn(*tensors[0].shape, generator=gen, device=DEVICE, dtype=torch.float64),
               torch.randn(*tensors[0].shape[:2], generator=gen, device=DEVICE, dtype=torch.float64)]

    def call(backend):
        return lambda q, k, v, sinks: backend(q, k, v, layout, head_dim ** -0.5, window=window, softcap=softcap,
                                              sinks=sinks)

    got = _outputs_and_grads(call(triton_prefix_attention), tensors, weights, torch.bfloat16)
    baseline = _outputs_and_grads(call(dense_attention), tensors, weights, torch.bfloat16)
    want = _outputs_and_grads(call(dense_attention), tensors, weights, torch.float64)
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, baseline, want):
        err = (a.double() - w).abs().max().item()
        baseline_err = (b.double() - w).abs().max().item()
        assert err <= 2 * baseline_err + 1e-5, (name, err, baseline_err)
