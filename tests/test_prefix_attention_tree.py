"""prefix_attention on prefix trees (GroupLayout.from_sequences) against per-SEQUENCE dense
causal attention, on the ``reference`` and ``torch`` backends in float64.

Random trees: random depth and branching, ragged segments (1 token up to dozens), exact
duplicates, sequences that are prefixes of others. Every sequence's tokens are gathered
by ``layout.sequence_positions(i)`` and run alone through plain causal attention written
here (no library code); the packed output and lse must equal it at that sequence's tokens,
for every sequence (so a shared token agrees with every sequence holding it). Gradients:
the packed loss ``sum(g * out) + sum(h * lse)`` equals the sum over sequences of the same
loss on the sequence's tokens weighted by ``1 / (number of sequences holding the token)``;
its q/k/v/sinks gradients must be equal. Tolerance 1e-10 (float64).
"""
import math
import random

import pytest
import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import prefix_sharing_mask, torch_backend, torch_plan

F64 = torch.float64
TOL = 1e-10
BACKENDS = ["reference", "torch-auto", "torch-chunked"]
FEATURES = {
    "plain": {},
    "window1": {"window": 1},
    "window2": {"window": 2},
    "window5": {"window": 5},
    "softcap": {"softcap": 2.0},
    "sinks": {"sinks": True},
    "window4-softcap-sinks": {"window": 4, "softcap": 2.0, "sinks": True},
}


def random_tree_sequences(seed: int, max_run: int = 6) -> list[list[int]]:
    """Branching random walks: a few roots, random depth and fan-out, runs of 0..max_run
    new tokens per branch (0: the child ends where its parent does), then exact duplicates
    and prefixes of others. A large vocabulary keeps siblings apart (the tree is mostly
    the walk's own); repeated tokens are allowed and merge as the radix tree says."""
    rng = random.Random(seed)
    sequences: list[list[int]] = []
    for _ in range(rng.randint(1, 3)):
        frontier = [[rng.randrange(50) for _ in range(rng.randint(1, max_run))]]
        for _depth in range(rng.randint(0, 4)):
            children = []
            for node in frontier:
                for _ in range(rng.randint(1, 3)):
                    children.append(node + [rng.randrange(50) for _ in range(rng.randint(0, max_run))])
            frontier = children
        sequences.extend(frontier)
    picks = [rng.choice(sequences) for _ in range(rng.randint(0, 3))]
    sequences += [list(s) for s in picks]  # exact duplicates
    sequences += [s[:rng.randint(1, len(s))] for s in picks]  # prefixes of others
    rng.shuffle(sequences)
    return sequences


def dense_causal(q, k, v, *, softmax_scale, window=None, softcap=None, sinks=None):
    """Plain causal attention of ONE sequence ``[L, H, D]`` (K/V heads repeated for GQA)."""
    hq, hkv, length = q.shape[1], k.shape[1], q.shape[0]
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(length)
    visible = i[None, :] <= i[:, None]
    if window is not None:
        visible &= i[None, :] > i[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks[:, None, None].expand(-1, length, 1)], -1)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None])[..., :length]
    return torch.einsum("hqk,khd->qhd", probs, v), lse.transpose(0, 1)


def make_inputs(layout, hq, hkv, d, seed, with_sinks):
    g = torch.Generator().manual_seed(seed)
    t = layout.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=F64) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, generator=g, dtype=F64) if with_sinks else None
    cotangents = torch.randn(t, hq, d, generator=g, dtype=F64), torch.randn(t, hq, generator=g, dtype=F64)
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, sinks)], cotangents


def run_backend(name, monkeypatch):
    if name == "torch-chunked":
        # The explicit-score engine that non-CPU devices run, forced for every call on CPU.
        monkeypatch.setattr(torch_backend, "engine_for",
                            lambda device, window=None, softcap=None: torch_backend.chunked_engine(window, softcap))
    return "reference" if name == "reference" else "torch"


def gradients(loss, leaves):
    present = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [next(grads) if x is not None else None for x in leaves]


def check_against_sequences(layout, hq, hkv, d, features, backend, seed=0):
    """The module docstring's check on one layout."""
    features = dict(features)
    leaves, (grad_out, grad_lse) = make_inputs(layout, hq, hkv, d, seed, features.pop("sinks", False))
    q, k, v, sinks = leaves
    scale = 1 / math.sqrt(d)
    out, lse = prefix_attention(q, k, v, layout, softmax_scale=scale, sinks=sinks, backend=backend,
                                return_lse=True, **features)
    packed_grads = gradients((out * grad_out).sum() + (lse * grad_lse).sum(), leaves)

    holders = torch.zeros(layout.total_tokens, dtype=F64)
    for i in range(layout.num_sequences):
        holders[layout.sequence_positions(i)] += 1
    assert bool((holders >= 1).all())
    loss = 0
    for i in range(layout.num_sequences):
        rows = layout.sequence_positions(i)
        seq_out, seq_lse = dense_causal(q[rows], k[rows], v[rows], softmax_scale=scale, sinks=sinks, **features)
        torch.testing.assert_close(out[rows], seq_out, rtol=TOL, atol=TOL, msg=f"out of sequence {i}")
        torch.testing.assert_close(lse[rows], seq_lse, rtol=TOL, atol=TOL, msg=f"lse of sequence {i}")
        weight = 1 / holders[rows]
        loss = loss + (seq_out * grad_out[rows] * weight[:, None, None]).sum() + (
            seq_lse * grad_lse[rows] * weight[:, None]).sum()
    sequence_grads = gradients(loss, leaves)
    for name, a, e in zip(["dq", "dk", "dv", "dsinks"], packed_grads, sequence_grads):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("seed", range(4))
def test_random_trees_match_per_sequence_attention(seed, feature, backend, monkeypatch):
    sequences = random_tree_sequences(seed)
    layout = GroupLayout.from_sequences(sequences)
    assert not layout.is_flat or seed > 0  # the random trees are deeper than one level
    check_against_sequences(layout, 6, 2, 7, FEATURES[feature], run_backend(backend, monkeypatch), seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", ["plain", "window5", "window4-softcap-sinks"])
def test_deep_chain_with_odd_sizes(feature, backend, monkeypatch):
    """Per-step histories: every sequence extends the previous one (a chain of prefixes, each
    also branching once), segments of 1, 7 and 97 tokens, G = 1 and MQA heads."""
    rng = random.Random(3)
    history: list[int] = []
    sequences = []
    for step_len in (7, 1, 97, 1, 7):
        history = history + [rng.randrange(1000) for _ in range(step_len)]
        sequences.append(history)
        sequences.append(history + [1000 + len(sequences)])  # a one-token branch off the step
    layout = GroupLayout.from_sequences(sequences)
    assert max(len(layout.key_runs(s)) for s in range(len(layout.segments))) >= 5
    check_against_sequences(layout, 3, 1, 5, FEATURES[feature], run_backend(backend, monkeypatch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sequence_and_all_duplicates(backend, monkeypatch):
    name = run_backend(backend, monkeypatch)
    check_against_sequences(GroupLayout.from_sequences([[5]]), 2, 2, 3, FEATURES["sinks"], name)
    check_against_sequences(GroupLayout.from_sequences([[1, 2, 3]] * 3), 2, 1, 3, FEATURES["window2"], name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", ["plain", "window4-softcap-sinks"])
def test_system_prompt_shared_across_groups(feature, backend, monkeypatch):
    """from_padded(share_across_groups=True, min_shared=1): a common system prompt under every group's prompt."""
    system, rng = list(range(100, 109)), random.Random(5)
    prompts = [system + [rng.randrange(50) for _ in range(n)] for n in (3, 6)]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    layout = GroupLayout.from_padded(prompt_mask, completion_mask, [2, 2], prompt_ids=prompt_ids,
                                     share_across_groups=True, min_shared=1)
    assert len(layout.segmentation.groups) == 1  # one root: the system prompt
    check_against_sequences(layout, 4, 2, 4, FEATURES[feature], run_backend(backend, monkeypatch))


@pytest.mark.parametrize("feature", list(FEATURES))
def test_one_level_layout_built_as_a_tree(feature):
    """The same batch as a one-level layout (from_lengths) and as from_sequences of its rows:
    identical outputs on the torch backend, at every packed token (same packing)."""
    prompts, completions = [[1, 2, 3, 4], [5, 6]], [[[7, 8], [9], [10, 11, 12]], [[13, 14, 15], [16]]]
    one_level = GroupLayout.from_lengths([4, 2], [[2, 1, 3], [3, 1]])
    tree = GroupLayout.from_sequences([p + c for p, cs in zip(prompts, completions) for c in cs])
    assert tree.segments == one_level.segments
    features = dict(FEATURES[feature])
    (q, k, v, sinks), _ = make_inputs(one_level, 4, 2, 8, 1, features.pop("sinks", False))
    a = prefix_attention(q, k, v, one_level, sinks=sinks, backend="torch", return_lse=True, **features)
    b = prefix_attention(q, k, v, tree, sinks=sinks, backend="torch", return_lse=True, **features)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=TOL, atol=TOL)


def test_mask_is_ancestors_and_causal_self():
    """prefix_sharing_mask on a tree: key k is visible from q iff k's segment is q's or an
    ancestor of it and k comes first, brute-forced from the sequences."""
    layout = GroupLayout.from_sequences(random_tree_sequences(11))
    expected = torch.zeros(layout.total_tokens, layout.total_tokens, dtype=torch.bool)
    for i in range(layout.num_sequences):
        rows = layout.sequence_positions(i)
        expected[rows[:, None], rows[None, :]] |= torch.ones(len(rows), len(rows), dtype=torch.bool).tril()
    assert torch.equal(prefix_sharing_mask(layout), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_kv_stays_in_its_subtree(backend, monkeypatch):
    """A NaN/inf in one token's K/V reaches only the rows of its segment's subtree (the
    rows that see it) and the q/k/v gradients of every other row/key are those of a clean
    batch, bitwise."""
    name = run_backend(backend, monkeypatch)
    layout = GroupLayout.from_sequences(random_tree_sequences(2))
    mask = prefix_sharing_mask(layout)
    token = max(range(layout.total_tokens), key=lambda t: int(mask[:, t].sum()) * (t % 3 == 1))
    (q, k, v, _), (grad_out, _) = make_inputs(layout, 4, 2, 3, 0, False)

    def run(poison):
        leaves = [x.detach().clone() for x in (q, k, v)]
        if poison:
            leaves[1][token, 1], leaves[2][token, 0] = float("nan"), float("inf")
        leaves = [x.requires_grad_() for x in leaves]
        out = prefix_attention(*leaves, layout, window=4, backend=name)
        return [out, *torch.autograd.grad((out * grad_out).sum(), leaves)]

    clean, poisoned = run(False), run(True)
    rows = mask[:, token]
    keys = mask[rows].any(0)
    # Every row that sees the poisoned key through the window (window=4 below) is poisoned;
    # the rest of its subtree may be too (0 * inf), everything outside it is clean.
    seen = prefix_sharing_mask(layout, 4)[:, token]
    assert not poisoned[0][seen].reshape(int(seen.sum()), -1).isfinite().all(dim=1).any()
    for label, a, e in zip(["out", "dq", "dk", "dv"], poisoned, clean):
        unaffected = ~keys if label in ("dk", "dv") else ~rows
        assert torch.equal(a[unaffected], e[unaffected]), label


def test_torch_backend_reads_each_run_once_for_its_subtree():
    """Without a window, part (2) of the torch backend is one dense call per segment with
    descendants: its own run's keys (a slice of the packed K/V, not a copy per descendant)
    against the one contiguous range of its subtree's later tokens. With a window, a
    segment's first tokens meet only the ancestors' last keys within the window, once."""
    layout = GroupLayout.from_sequences(random_tree_sequences(1))
    segmentation = layout.segmentation
    plan = torch_plan.attention_plan(layout)
    expected = [(slice(start + length, segmentation.subtree_end(s)), slice(start, start + length), length)
                for s, (start, length, _) in enumerate(segmentation.segments)
                if segmentation.subtree_end(s) > start + length]
    assert len(expected) > 1
    assert torch_plan.cross_calls(plan, None) == expected
    batched = 0
    for layout in (layout, GroupLayout.from_lengths([5, 2], [[4, 4, 1, 4], [3]])):
        plan, positions = torch_plan.attention_plan(layout), layout.position_ids
        for window in (1, 2, 5):
            seen = 0
            for queries, keys, query_offset in torch_plan.cross_calls(plan, window):
                rows = [torch.arange(queries.start, queries.stop)] if isinstance(queries, slice) else list(queries)
                batched += len(rows) > 1
                for row in rows:  # a batched call's rows: segments meeting these keys at this offset
                    assert bool((layout.token_segment[row] == layout.token_segment[row[0]]).all())
                    gaps = positions[row][:, None] - positions[keys][None, :]
                    assert bool((gaps > 0).all()) and bool((gaps[0] < window).all())  # all in the first's window
                    assert bool((gaps[-1] < window).any())  # every query sees a key
                    assert query_offset == positions[row[0]] - positions[keys.start]
                    seen += int((gaps < window).sum())
            # Every (query, ancestor key) pair within the window is met once: the mask's count.
            mask = prefix_sharing_mask(layout, window)
            own = layout.token_segment[:, None] == layout.token_segment[None, :]
            assert seen == int((mask & ~own).sum())
    assert batched  # siblings meeting the same keys share a call (a group's completions)
