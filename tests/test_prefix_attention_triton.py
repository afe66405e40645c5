"""backend="triton" against the dense float64 reference.

Without a GPU the kernels run through the Triton interpreter (fp32, tiny shapes, query
and key tiles of 32 rows walked in blocks of 16, so diagonals span several blocks and
lengths such as 1, 7, 19, 97 leave partial tiles).
"""
import os
import shutil

import torch

if not torch.cuda.is_available() and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402

from prefix_grouper import GroupLayout, prefix_attention  # noqa: E402
from prefix_grouper.attention.reference import prefix_sharing_mask, reference_prefix_attention  # noqa: E402
from prefix_grouper.attention import triton_backend  # noqa: E402
from prefix_grouper.attention.triton_common import HeadPacking, head_packing  # noqa: E402
from prefix_grouper.attention.triton_backend import (  # noqa: E402
    HOPPER_SMS, dkdv_chunk_rows, key_tile_rows, query_tile_rows, triton_prefix_attention,
)
from prefix_grouper.runtime import triton_unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if triton_unavailable_reason(DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {triton_unavailable_reason(DEVICE)}", allow_module_level=True)

# fp32 kernels (fp32 dot products, fp32 online softmax) against float64: over at most a
# few hundred keys of unit-scale inputs, rounding stays around 1e-6 (observed <= 2e-6 on
# the interpreter). 1e-4 leaves 50x headroom, while a wrong mask or a missed key block
# moves values by O(0.1).
FP32_ATOL = 1e-4

RAGGED = ([1, 7, 20], [[0, 1, 7], [19], [7, 0, 1, 19]])  # empty completions, G = 3, 1, 4
LONG = ([97, 5], [[1, 40], [33]])  # a prefix spanning several tiles, a partial last tile
SINGLE = ([33], [[45]])  # G = 1
# GPU tiles are 32-128 rows: lengths around and across several of them.
GPU_SIZED = ([300, 129], [[0, 257, 1], [128, 500]])


def _layout(lengths):
    return GroupLayout.from_lengths(*lengths, device=DEVICE)


def _inputs(layout, q_heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    t = layout.total_tokens

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)

    return randn(t, q_heads, head_dim), randn(t, kv_heads, head_dim), randn(t, kv_heads, head_dim)


def _grads(fn, q, k, v, out_weight, lse_weight):
    """``(out, lse, dq, dk, dv)`` of ``sum(out * out_weight) + sum(lse * lse_weight)``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = 0
    if out_weight is not None:
        loss = loss + (out.to(out_weight.dtype) * out_weight).sum()
    if lse_weight is not None:
        loss = loss + (lse.to(lse_weight.dtype) * lse_weight).sum()
    # lse does not depend on v: the reference leaves dv unset for an lse-only loss.
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    dq, dk, dv = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v)))
    return out.detach(), lse.detach(), dq, dk, dv


def _max_errors(layout, q, k, v, scale, use_out=True, use_lse=True):
    """Max abs error of (out, lse, dq, dk, dv) of the triton backend vs float64 reference."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    t, hq, d = q.shape
    out_weight = torch.randn(t, hq, d, generator=gen, device=DEVICE, dtype=torch.float64) if use_out else None
    lse_weight = torch.randn(t, hq, generator=gen, device=DEVICE, dtype=torch.float64) if use_lse else None
    got = _grads(lambda *x: prefix_attention(*x, layout, softmax_scale=scale, backend="triton",
                                             return_lse=True), q, k, v, out_weight, lse_weight)
    want = _grads(lambda *x: reference_prefix_attention(*x, layout, scale),
                  q.double(), k.double(), v.double(), out_weight, lse_weight)
    return [(a.double() - b).abs().max().item() for a, b in zip(got, want)]


@pytest.mark.parametrize("lengths, q_heads, kv_heads, head_dim", [
    (RAGGED, 2, 2, 16),
    (RAGGED, 4, 2, 32),   # GQA
    (RAGGED, 3, 1, 24),   # MQA, head dim padded to 32 inside the kernels
    (LONG, 4, 2, 16),
    (SINGLE, 1, 1, 80),   # padded to 128
    (LONG, 7, 1, 16),     # 7 heads packed per program: 4-token tiles, 4 idle score rows
    pytest.param(GPU_SIZED, 4, 2, 64, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="too slow for the interpreter")),
])
def test_matches_reference_fp32(lengths, q_heads, kv_heads, head_dim):
    layout = _layout(lengths)
    q, k, v = _inputs(layout, q_heads, kv_heads, head_dim)
    errors = _max_errors(layout, q, k, v, scale=head_dim ** -0.5)
    assert max(errors) <= FP32_ATOL, dict(zip(("out", "lse", "dq", "dk", "dv"), errors))


@pytest.mark.parametrize("use_out, use_lse", [(True, False), (False, True)])
def test_loss_on_one_output_only(use_out, use_lse):
    """The unused output's gradient arrives as None; both paths must still be exact."""
    layout = _layout(RAGGED)
    q, k, v = _inputs(layout, 2, 1, 16, seed=2)
    errors = _max_errors(layout, q, k, v, scale=0.7, use_out=use_out, use_lse=use_lse)
    assert max(errors) <= FP32_ATOL, errors


def test_non_contiguous_inputs():
    layout = _layout(RAGGED)
    t, d = layout.total_tokens, 16
    q0, k0, v0 = _inputs(layout, 4, 2, 2 * d, seed=3)
    q = q0[..., :d]                                   # head stride 2D
    k = k0.transpose(0, 1).contiguous().transpose(0, 1)[..., d:]  # head-major storage
    v = v0[..., ::2]                                  # last-dim stride 2: copied
    assert not any(x.is_contiguous() for x in (q, k, v)) and q.shape == (t, 4, d)
    errors = _max_errors(layout, q, k, v, scale=d ** -0.5)
    assert max(errors) <= FP32_ATOL, errors


def test_tile_schedules_cover_the_layout_once():
    tile = 4
    layout = GroupLayout.from_lengths([1, 9], [[0, 5, 0], [4, 8]])
    segments = layout.cu_seqlens.tolist()
    query_rows, runs = query_tile_rows(layout.segmentation, tile)
    covered = sorted(r for q_start, _, seg_end, _, _ in query_rows
                     for r in range(q_start, min(q_start + tile, seg_end)))
    assert covered == list(range(layout.total_tokens))
    for q_start, seg_start, seg_end, runs_begin, runs_end in query_rows:
        assert (seg_start, seg_end) in zip(segments, segments[1:]) and seg_start <= q_start < seg_end
        assert (q_start - seg_start) % tile == 0
        group = layout.token_group[q_start].item()
        is_suffix = layout.token_completion[q_start].item() >= 0
        # A completion's one ancestor run is its group's prefix; a prefix has none.
        prefix = (layout.prefix_starts[group].item(), layout.prefix_lens[group].item())
        assert [tuple(run[:2]) for run in runs[runs_begin:runs_end]] == ([prefix] if is_suffix else [])
    mask = prefix_sharing_mask(layout)
    for chunk_rows in (tile, 2 * tile, 64 * tile):  # every range split, some, none
        programs, split = key_tile_rows(layout.segmentation, tile, chunk_rows)
        chunks_per_tile = {}
        for k_start, k_end, chunk_start, chunk_end, slot, pos_shift in programs:
            assert k_start <= chunk_start < chunk_end <= chunk_start + chunk_rows and pos_shift == 0
            chunks_per_tile.setdefault((k_start, k_end), []).append((chunk_start, chunk_end, slot))
        assert sorted(r for k_start, k_end in chunks_per_tile
                      for r in range(k_start, min(k_start + tile, k_end))) == list(range(layout.total_tokens))
        for (k_start, _), chunks in chunks_per_tile.items():
            # The chunks tile exactly who sees the tile's first key, [k_start, q_end).
            seen_by = mask[:, k_start].nonzero().flatten().tolist()
            assert sorted(r for start, end, _ in chunks for r in range(start, end)) == seen_by
            assert (len(chunks) == 1) == (chunks[0][2] == -1)
        # Each split tile's partial slots are its own chunks' slots, numbered once.
        assert sorted((k_start, k_end, first, count) for k_start, k_end, first, count in split) == sorted(
            (k_start, k_end, min(c[2] for c in chunks), len(chunks))
            for (k_start, k_end), chunks in chunks_per_tile.items() if len(chunks) > 1)
        assert sorted(p.partial_slot for p in programs if p.partial_slot >= 0) == list(range(sum(s.num_slots for s in split)))


# The issue's GQA shapes (bf16, D=128 and 64: key tiles of 128 rows) on a 132-SM Hopper GPU.
ISSUE_SHAPES = {  # name: (P, S, G, kv heads)
    "P4096 S512 G8 16/16 heads": (4096, 512, 8, 16),
    "Qwen2.5-1.5B 12/2 heads P4096 S256 G8": (4096, 256, 8, 2),
    "Qwen2.5-0.5B 14/2 heads P4096 S256 G8": (4096, 256, 8, 2),
}


@pytest.mark.parametrize("name", ISSUE_SHAPES)
def test_dkdv_launch_fills_hopper(name):
    """At least two dK/dV programs per SM (before the split: 96 at 12/2 heads), and no
    program walks more than a fair share of the queries."""
    prefix, suffix, groups, kv_heads = ISSUE_SHAPES[name]
    tile, sms = 128, HOPPER_SMS
    segmentation = GroupLayout.from_lengths([prefix], [[suffix] * groups]).segmentation
    chunk_rows = dkdv_chunk_rows(segmentation, tile, kv_heads, 2 * sms)
    programs, _ = key_tile_rows(segmentation, tile, chunk_rows)
    assert len(programs) * kv_heads >= 2 * sms * 0.9, (len(programs), chunk_rows)
    query_rows = [end - start for _, _, start, end, _, _ in programs]
    assert max(query_rows) <= chunk_rows and max(query_rows) <= 2 * sum(query_rows) / len(query_rows) * kv_heads


@pytest.mark.parametrize("chunk_rows", [48, 10**6])
def test_dkdv_chunk_lengths(monkeypatch, chunk_rows):
    """Under the interpreter the host splits every key tile into one-tile chunks; chunks
    spanning the diagonal, whole and partial query blocks (48 rows: 1.5 tiles), and no
    split at all, must be exact too."""
    monkeypatch.setattr(triton_backend, "dkdv_chunk_rows", lambda *args: chunk_rows)
    layout = _layout(LONG)
    q, k, v = _inputs(layout, 2, 1, 16, seed=11)
    errors = _max_errors(layout, q, k, v, scale=0.25)
    assert max(errors) <= FP32_ATOL, dict(zip(("out", "lse", "dq", "dk", "dv"), errors))


def test_head_packing():
    # Qwen2.5-1.5B (12/2 heads) and 0.5B (14/2): a KV head's query heads share 128 score rows.
    assert head_packing(128, 6) == HeadPacking(block_m=128, heads_per_program=6, tile_tokens=21)
    assert head_packing(128, 7) == HeadPacking(block_m=128, heads_per_program=7, tile_tokens=18)
    assert head_packing(128, 1) == HeadPacking(block_m=128, heads_per_program=1, tile_tokens=128)
    # More heads than rows: the largest divisor that fits, packs never straddle KV heads.
    assert head_packing(32, 96) == HeadPacking(block_m=32, heads_per_program=32, tile_tokens=1)
    assert head_packing(32, 66) == HeadPacking(block_m=32, heads_per_program=22, tile_tokens=1)


def test_backward_bitwise_repeatable():
    """Split dK/dV partials are summed in a fixed order: two runs agree bit for bit."""
    layout = _layout(RAGGED)  # its largest group's prefix tile is split in two
    q, k, v = _inputs(layout, 4, 2, 16, seed=9)
    gen = torch.Generator(device=DEVICE).manual_seed(10)
    out_weight = torch.randn(*q.shape, generator=gen, device=DEVICE)

    def run():
        return _grads(lambda *x: triton_prefix_attention(*x, layout, 0.25), q, k, v, out_weight, None)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_custom_op_registration():
    layout = _layout(([3, 2], [[2, 0], [1]]))
    q, k, v = _inputs(layout, 2, 1, 16, seed=4)
    host = layout.host_lengths
    assert host.device.type == "cpu" and host.tolist() == [2, 3, 2, 2, 1, 2, 0, 1]
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
        fwd(q, k, v, None, other.host_lengths, *plain[1:])
    with pytest.raises(ValueError, match="host_lengths is not"):
        fwd(q, k, v, None, torch.tensor([2, 3, 2, 2, 1, 2, 0]), *plain[1:])


def test_eager_calls_skip_the_library_dispatch(monkeypatch):
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


def test_torch_compile_fullgraph_across_layouts(monkeypatch):
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
    # (a single group included: the layout reaches the ops as one tensor of 1 + 2B + N >= 4
    # lengths, never of a size 0 or 1 that Dynamo would specialize on).
    assert counter.frame_count <= 2, counter.frame_count


def test_unavailable_reason():
    assert triton_unavailable_reason(DEVICE) is None
    assert "meta" in triton_unavailable_reason(torch.device("meta"))


def _dense_attention(q, k, v, layout, scale):
    """Plain PyTorch attention computed in the inputs' dtype (the low-precision baseline)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~prefix_sharing_mask(layout), float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1).transpose(0, 1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v), lse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_flash_attention_rule(head_dim):
    """Error vs float64 <= 2x the error of plain bf16 PyTorch (+ eps), and deterministic."""
    layout = _layout(([300, 1000, 64], [[0, 129, 500, 1], [7, 300], [200] * 8]))
    q, k, v = _inputs(layout, 8, 2, head_dim, dtype=torch.bfloat16, seed=6)
    scale = head_dim ** -0.5
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    out_weight = torch.randn(*q.shape, generator=gen, device=DEVICE, dtype=torch.float64)
    lse_weight = torch.randn(*q.shape[:2], generator=gen, device=DEVICE, dtype=torch.float64)

    def triton_fn(*x):
        return triton_prefix_attention(*x, layout, scale)

    got = _grads(triton_fn, q, k, v, out_weight, lse_weight)
    baseline = _grads(lambda *x: _dense_attention(*x, layout, scale), q, k, v, out_weight, lse_weight)
    want = _grads(lambda *x: reference_prefix_attention(*x, layout, scale),
                  q.double(), k.double(), v.double(), out_weight, lse_weight)
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv"), got, baseline, want):
        err = (a.double() - w).abs().max().item()
        baseline_err = (b.double() - w).abs().max().item()
        assert err <= 2 * baseline_err + 1e-5, (name, err, baseline_err)
    again = _grads(triton_fn, q, k, v, out_weight, lse_weight)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_fake_tensors_take_the_op_and_its_fake():
    """Outside torch.compile, FakeTensor inputs (shape propagation, memory planning) still
    reach the custom op's fake, never the kernels."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = _layout(RAGGED)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v = (mode.from_tensor(x) for x in _inputs(layout, 4, 2, 16, seed=4))
        out, lse = prefix_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:2] and lse.dtype == torch.float32
