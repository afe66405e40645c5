"""The torch backend's insides: its attention engines against the dense oracle (query
offsets, chunk borders), its plan's calls (each run read once for its subtree, windowed calls
meeting every pair once), and the key chunks a window skips. Its correctness on layouts is in
test_prefix_attention.py's matrix (as "torch" and "torch-chunked").

Tolerance 1e-10 in float64: summation order only (~1e-15 relative).
"""
import pytest
import torch
from attention_oracle import (
    assert_all_close, causal_visible, make_inputs, masked_attention, oracle,
    random_tree_sequences,
)
from attention_oracle import outputs_and_grads

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import prefix_sharing_mask, torch_backend, torch_plan

NAMES = ["out", "lse", "dq", "dk", "dv"]


def force_chunked(monkeypatch):
    """The explicit-score engine that non-CPU devices run, forced for every call on CPU."""
    monkeypatch.setattr(torch_backend, "engine_for",
                        lambda device, window=None, softcap=None, **_: torch_backend.chunked_engine(window, softcap))


ENGINES = {"CPU_FLASH": (None, None), "CHUNKED": (None, None), "chunked-window4": (4, None),
           "chunked-softcap": (None, 0.7), "chunked-window1-softcap": (1, 2.0)}


@pytest.mark.parametrize("with_grad_lse", [True, False], ids=["grad-lse", "no-grad-lse"])
@pytest.mark.parametrize("score_block_bytes", [2080, 2**26], ids=["row-and-query-chunks", "one-chunk"])
@pytest.mark.parametrize("query_offset", [0, 5, 13], ids=["causal", "offset5", "dense"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_prefix_attention_torch_engines_match_dense(engine, query_offset, score_block_bytes, with_grad_lse,
                                                    monkeypatch, generator):
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

    # The oracle per batch row, head-first [R, H, L, D] <-> token-first [L, H, D].
    visible = causal_visible(queries, 13, query_offset, window)
    rows = [masked_attention(q[r].transpose(0, 1), k[r].transpose(0, 1), v[r].transpose(0, 1), visible, 0.3,
                             softcap=softcap) for r in range(3)]
    out = torch.stack([o.transpose(0, 1) for o, _ in rows])
    lse = torch.stack([m.transpose(0, 1) for _, m in rows])
    loss = (out * grad_out).sum() + (0 if grad_lse is None else (lse * grad_lse).sum())
    expected = [out, lse, *torch.autograd.grad(loss, (q, k, v))]
    with torch.no_grad():
        actual_out, actual_lse = runner.forward(q, k, v, query_offset, 0.3)
        actual = [actual_out, actual_lse,
                  *runner.backward(grad_out, q, k, v, out, lse, grad_lse, query_offset, 0.3)]
    for name, a, e in zip(NAMES, actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


CHUNK_FEATURES = {"window3": {"window": 3}, "window8": {"window": 8}, "window1": {"window": 1},
                  "window5-softcap2-sinks": {"window": 5, "softcap": 2.0, "sinks": True}, "softcap2": {"softcap": 2.0}}


@pytest.mark.parametrize("feature", list(CHUNK_FEATURES))
def test_prefix_attention_torch_chunk_borders_and_skipped_keys(feature, monkeypatch):
    """Tiny chunks: query chunks cut every segment (and the window's diagonal band) and most
    key ranges start after key 0, so the skipped keys and per-chunk masks are exercised."""
    force_chunked(monkeypatch)
    monkeypatch.setattr(torch_backend, "CPU_SCORE_BLOCK_BYTES", 6 * 11 * 8 * 3)  # ~3 queries of 6 heads x 11 keys
    monkeypatch.setattr(torch_backend, "MIN_WINDOW_QUERIES", 2)
    layout = GroupLayout.from_lengths([23, 5], [[19, 1, 0], [30]])
    features = dict(CHUNK_FEATURES[feature])
    with_sinks = features.pop("sinks", False)
    leaves, cotangents = make_inputs(layout, 6, 2, 8, seed=2, sinks=with_sinks)

    def run(q, k, v, sinks):
        return prefix_attention(q, k, v, layout, backend="torch", return_lse=True, sinks=sinks, **features)

    expected = oracle(layout, leaves, cotangents, features, 8 ** -0.5)
    assert_all_close(outputs_and_grads(run, leaves, cotangents), expected, 1e-10)


def test_prefix_attention_torch_window_skips_key_chunks():
    """A window bounds the keys each chunk scores: O(T * (window + chunk)) work, not O(T^2)."""
    q = torch.zeros(1, 4, 2000, 8)
    k = torch.zeros(1, 2, 2000, 8)
    scored = {window: sum((qs.stop - qs.start) * (ks.stop - ks.start)
                          for _, qs, ks, _ in torch_backend._chunks(q, k, 0, window))
              for window in (None, 16, 300)}
    assert scored[None] >= 2000 * 2001 // 2
    assert scored[16] <= 2000 * (torch_backend.MIN_WINDOW_QUERIES + 16)
    assert scored[300] <= 2000 * 2 * 300


def test_prefix_attention_torch_plan_reads_each_run_once_for_its_subtree():
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


def run_torch(layout, **features):
    def run(q, k, v, sinks):
        return prefix_attention(q, k, v, layout, backend="torch", return_lse=True, sinks=sinks, **features)
    return run


@pytest.mark.parametrize("call_bytes", [2**20, 64], ids=["default-calls", "tiny-calls"])
def test_prefix_attention_torch_equal_rows_run_as_one_call(call_bytes, monkeypatch):
    """Nothing shared and equal rows (G=1, equal prompts and completions): one causal call
    over every token, whose results are the packed outputs, however small calls are cut;
    exact with sinks and an LSE gradient, GQA, in float64."""
    monkeypatch.setattr(torch_plan, "CALL_BYTES", call_bytes)
    layout = GroupLayout.from_lengths([5, 5, 5], [[4], [4], [4]])
    causal, cross = torch_plan.schedule(torch_plan.attention_plan(layout), None, 4 * 8 * 8)
    assert [(rows.count, rows.width, rows.start, rows.stride) for rows in causal] == [(3, 9, 0, 9)] and not cross
    leaves, cotangents = make_inputs(layout, 4, 2, 8, seed=5, sinks=True)
    expected = oracle(layout, leaves, cotangents, {}, 8 ** -0.5)
    assert_all_close(outputs_and_grads(run_torch(layout), leaves, cotangents), expected, 1e-10,
                     names=[*NAMES, "dsinks"])


@pytest.mark.parametrize("suffix_lens, all_views", [([[3, 2]] * 4, True), ([[3, 2]] * 3 + [[2, 3]], True),
                                                     ([[3, 4], [4, 3], [3, 3]], False)],
                         ids=["equal-groups", "one-odd-group", "ragged"])
def test_prefix_attention_torch_siblings_batched_as_views(suffix_lens, all_views, monkeypatch):
    """Equal groups' i-th completions are evenly spaced where a group's siblings are not:
    they are batched per ordinal as views of the packed axis (no gather), and runs that fit
    no view are gathered (padded where lengths differ); float64-exact either way."""
    monkeypatch.setattr(torch_plan, "CALL_BYTES", 3 * 4 * 2 * 8 * 8)  # 3 rows of 4 tokens per call
    layout = GroupLayout.from_lengths([6] * len(suffix_lens), suffix_lens)
    causal, _ = torch_plan.schedule(torch_plan.attention_plan(layout), None, 2 * 8 * 8)
    completions = [rows for rows in causal if rows.width <= 4]
    assert sum(rows.count for rows in completions) == 2 * len(suffix_lens)
    assert all(rows.stride is not None for rows in completions) == all_views
    leaves, cotangents = make_inputs(layout, 2, 2, 8, seed=6)
    expected = oracle(layout, leaves, cotangents, {}, 8 ** -0.5)
    assert_all_close(outputs_and_grads(run_torch(layout), leaves, cotangents), expected, 1e-10)
