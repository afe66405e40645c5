"""backend="triton" on prefix-tree layouts (GroupLayout.from_sequences) against per-sequence
dense float64 attention.

Each sequence's tokens are gathered from the packed batch (``layout.sequence_positions``)
and attended densely and causally on their own; every packed token's output and lse must
equal its value in any sequence that holds it, and the gradients of q, k, v (and sinks) of
a loss on the packed outputs must equal those of the same loss spread over the sequences
(a shared token's loss weight counted once). Under the interpreter: fp32, tiny shapes.
"""
import os
import shutil

import torch

if not torch.cuda.is_available() and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402

from prefix_grouper import GroupLayout  # noqa: E402
from prefix_grouper.attention.triton_backend import (  # noqa: E402
    key_tile_rows, query_tile_rows, triton_prefix_attention,
)
from prefix_grouper.layout import segmentation_of  # noqa: E402
from prefix_grouper.runtime import triton_unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if triton_unavailable_reason(DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {triton_unavailable_reason(DEVICE)}", allow_module_level=True)

# fp32 kernels against float64 over at most ~100 keys of unit-scale inputs: rounding stays
# around 1e-6; a missed or extra key block moves values by O(0.1).
FP32_ATOL = 1e-4


def _random_sequences(seed, num_roots=2, depth=3, max_branch=3, max_len=20):
    """Token sequences of a random forest: ragged runs (1..max_len tokens), up to ``depth``
    levels below a root, plus an exact duplicate and a sequence that is a prefix of another."""
    gen = torch.Generator().manual_seed(seed)

    def rand(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    sequences, next_token = [], [0]

    def run():
        length = rand(1, max_len)
        next_token[0] += length
        return list(range(next_token[0] - length, next_token[0]))

    def grow(path, level):
        children = rand(1, max_branch) if level < depth else 0
        if not children or rand(0, 3) == 0:
            sequences.append(path)
        for _ in range(children):
            grow(path + run(), level + 1)

    for _ in range(num_roots):
        grow(run(), 1)
    sequences.append(list(sequences[0]))  # an exact duplicate
    longest = max(sequences, key=len)
    sequences.append(longest[:max(1, len(longest) // 2)])  # a prefix of another sequence
    return sequences


def _layout(seed, **kwargs):
    layout = GroupLayout.from_sequences(_random_sequences(seed, **kwargs), device=DEVICE)
    assert not layout.is_flat
    return layout


def _dense(q, k, v, scale, window=None, softcap=None, sinks=None):
    """``(out, lse)`` of one sequence's causal attention (GQA by repetition), float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    n = q.shape[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = j <= i
    if window is not None:
        visible &= i - window < j
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    if sinks is not None:
        scores = torch.cat([sinks[:, None, None].expand(-1, n, 1), scores], dim=2)
    lse = torch.logsumexp(scores, dim=2)
    probs = torch.exp(scores - lse[..., None])
    if sinks is not None:
        probs = probs[..., 1:]
    return torch.einsum("hij,jhd->ihd", probs, v), lse.t()


def _per_sequence(layout, q, k, v, scale, **features):
    """``(out, lse)`` scattered to packed tokens from every sequence's dense attention
    (each token taken from the last sequence holding it: all must agree, checked), and the
    per-sequence outputs for the gradient loss."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2], dtype=q.dtype, device=q.device)
    for i in range(layout.num_sequences):
        positions = layout.sequence_positions(i).to(q.device)
        seq_out, seq_lse = _dense(q[positions], k[positions], v[positions], scale, **features)
        out = out.index_copy(0, positions, seq_out)
        lse = lse.index_copy(0, positions, seq_lse)
    return out, lse


def _visible_tokens(layout):
    """Packed tokens of at least one sequence (every packed token is one, on a radix tree)."""
    seen = torch.zeros(layout.total_tokens, dtype=torch.bool)
    for i in range(layout.num_sequences):
        seen[layout.sequence_positions(i)] = True
    return seen


def _check(layout, q_heads, kv_heads, head_dim=16, scale=0.3, window=None, softcap=None, use_sinks=False, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    t = layout.total_tokens
    q, k, v = (torch.randn(t, h, head_dim, generator=gen, device=DEVICE) for h in (q_heads, kv_heads, kv_heads))
    sinks = torch.randn(q_heads, generator=gen, device=DEVICE) if use_sinks else None
    out_weight = torch.randn(q.shape, generator=gen, device=DEVICE)
    lse_weight = torch.randn(q.shape[:2], generator=gen, device=DEVICE)
    assert _visible_tokens(layout).all()

    def grads(fn, inputs):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out, lse = fn(*inputs)
        loss = (out * out_weight.to(out.dtype)).sum() + (lse * lse_weight.to(lse.dtype)).sum()
        return (out.detach(), lse.detach(), *torch.autograd.grad(loss, inputs))

    inputs = [q, k, v] + ([sinks] if use_sinks else [])
    features = {"window": window, "softcap": softcap}

    def triton_fn(q, k, v, s=None):
        return triton_prefix_attention(q, k, v, layout, scale, sinks=s, **features)

    def dense_fn(q, k, v, s=None):
        return _per_sequence(layout, q, k, v, scale, sinks=s, **features)

    got = grads(triton_fn, inputs)
    want = grads(dense_fn, [x.double() for x in inputs])
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    errors = {name: (a.double() - b).abs().max().item() for name, a, b in zip(names, got, want)}
    assert max(errors.values()) <= FP32_ATOL, errors
    return got


def _dense_consistency_check(layout):
    """The dense per-sequence computation itself: a shared token gets the same output from
    every sequence holding it (else scattering would hide a wrong tree)."""
    gen = torch.Generator().manual_seed(1)
    t = layout.total_tokens
    q, k, v = (torch.randn(t, 1, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    first = {}
    for i in range(layout.num_sequences):
        positions = layout.sequence_positions(i)
        out, _ = _dense(q[positions], k[positions], v[positions], 0.5)
        for p, o in zip(positions.tolist(), out):
            if p in first:
                torch.testing.assert_close(first[p], o)
            first[p] = o


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_trees_match_per_sequence_attention(seed):
    layout = _layout(seed)
    _dense_consistency_check(layout)
    _check(layout, q_heads=2, kv_heads=1, seed=seed)


def test_deep_chain_and_gqa():
    """Depth 4 chains (per-step histories), 4 query heads on 2 KV heads, an odd head dim (7)."""
    layout = _layout(3, num_roots=1, depth=4, max_branch=2, max_len=12)
    assert max(len(segmentation_of(layout.host_segments).key_runs(s))
               for s in range(len(layout.host_segments))) >= 3
    _check(layout, q_heads=4, kv_heads=2, head_dim=7, seed=3)


@pytest.mark.parametrize("window", [1, 5, 23])
def test_window_in_position_space(window):
    _check(_layout(4, max_len=14), q_heads=2, kv_heads=1, window=window, seed=4)


def test_softcap_and_sinks():
    _check(_layout(5), q_heads=2, kv_heads=2, softcap=3.0, use_sinks=True, seed=5)


def test_all_features_together():
    _check(_layout(6, max_len=12), q_heads=4, kv_heads=2, window=9, softcap=4.0, use_sinks=True, seed=6)


def test_bitwise_repeatable():
    layout = _layout(7)
    first = _check(layout, q_heads=2, kv_heads=1, window=11, seed=7)
    second = _check(layout, q_heads=2, kv_heads=1, window=11, seed=7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [None, 3, 17])
def test_key_schedule_covers_each_visible_pair_once(window):
    """dK/dV programs of a tree list each (query, key) pair a query sees exactly once (the
    kernel's masks: causal on packed indices, the window through pos_shift)."""
    layout = _layout(8, max_len=10)
    segmentation = segmentation_of(layout.host_segments)
    t, tile = layout.total_tokens, 8
    visible = torch.zeros(t, t, dtype=torch.long)
    position = layout.position_ids.cpu()
    for i in range(layout.num_sequences):
        p = layout.sequence_positions(i)
        i_idx, j_idx = p[:, None], p[None, :]
        seen = j_idx <= i_idx
        if window is not None:
            seen &= position[i_idx] - window < position[j_idx]
        visible[i_idx.expand_as(seen)[seen], j_idx.expand_as(seen)[seen]] = 1
    for chunk_rows in (tile, 10**6):
        programs, _ = key_tile_rows(segmentation, tile, chunk_rows, window)
        covered = torch.zeros(t, t, dtype=torch.long)
        for k_start, k_end, chunk_start, chunk_end, _, pos_shift in programs:
            keys = torch.arange(k_start, min(k_start + tile, k_end))
            rows = torch.arange(chunk_start, chunk_end)
            seen = rows[:, None] >= keys[None, :]
            if window is not None:
                seen &= rows[:, None] < keys[None, :] + window - pos_shift
            covered[rows[:, None], keys[None, :]] += seen.long()
        assert torch.equal(covered, visible)
    # Query tiles: every token once, each tile's runs its segment's ancestors.
    tiles, runs = query_tile_rows(segmentation, tile, window)
    covered = sorted(r for q_start, _, seg_end, _, _ in tiles for r in range(q_start, min(q_start + tile, seg_end)))
    assert covered == list(range(t))
    for q_start, seg_start, _, begin, end in tiles:
        index = int(layout.token_segment[q_start])
        assert [tuple(run[:2]) for run in runs[begin:end]] == [
            r for r in segmentation.key_runs(index)[:-1] if r[1]]


def test_system_prompt_shared_across_groups_through_the_api():
    """from_padded(share_across_groups=True, min_shared=1): a system prompt shared by two groups' different
    prompts (a depth-2 tree with completion leaves, one of them empty), via prefix_attention."""
    from prefix_grouper import prefix_attention

    system, prompts = [5, 6, 7, 8, 9, 10, 11], ([20, 21, 22], [30, 31, 32, 33, 34])
    rows = [system + list(p) for p in prompts]
    width = max(map(len, rows))
    prompt_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    completion_mask = torch.tensor([[1] * 6 + [0] * 3, [0] * 9, [1] * 9, [1] * 2 + [0] * 7])
    layout = GroupLayout.from_padded(prompt_mask.to(DEVICE), completion_mask.to(DEVICE), [2, 2],
                                     prompt_ids=prompt_ids.to(DEVICE), share_across_groups=True, min_shared=1)
    assert not layout.is_flat and layout.total_tokens == len(system) + 3 + 5 + 6 + 9 + 2
    _check(layout, q_heads=2, kv_heads=1, seed=9)
    gen = torch.Generator(device=DEVICE).manual_seed(10)
    q, k, v = (torch.randn(layout.total_tokens, 2, 16, generator=gen, device=DEVICE) for _ in range(3))
    got = prefix_attention(q, k, v, layout, backend="triton", window=4, softcap=2.0)
    want = prefix_attention(q.double(), k.double(), v.double(), layout, backend="reference", window=4, softcap=2.0)
    assert (got.double() - want).abs().max().item() <= FP32_ATOL


def test_torch_compile_on_tree_layouts():
    """The ops take a tree as host_segments: fullgraph compile, same loss and gradients as eager."""
    from prefix_grouper import prefix_attention

    def loss_fn(q, k, v, layout):
        out, lse = prefix_attention(q, k, v, layout, backend="triton", return_lse=True)
        return (out ** 2).sum() + lse.sum()

    compiled = torch.compile(loss_fn, backend="inductor" if DEVICE.type == "cuda" else "aot_eager", fullgraph=True)
    for seed in (10, 11):
        layout = _layout(seed, max_len=8)
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        inputs = [torch.randn(layout.total_tokens, 2, 16, generator=gen, device=DEVICE) for _ in range(3)]
        eager = [x.clone().requires_grad_() for x in inputs]
        traced = [x.clone().requires_grad_() for x in inputs]
        eager_loss, traced_loss = loss_fn(*eager, layout), compiled(*traced, layout)
        torch.testing.assert_close(traced_loss, eager_loss)
        for a, b in zip(torch.autograd.grad(traced_loss, traced), torch.autograd.grad(eager_loss, eager)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [None, 30])
def test_runs_spanning_several_tiles(window):
    """Segments of up to 45 tokens: ancestor runs and own segments over several 32-token
    tiles and 16-key blocks, partial last blocks, split dK/dV ranges."""
    _check(_layout(12, num_roots=1, depth=3, max_branch=2, max_len=45), q_heads=2, kv_heads=1, window=window,
           seed=12)
