"""The one oracle of ``prefix_attention`` and the layouts, trees and backend runs its tests share.

Oracle: every sequence of a layout (``layout.sequence_positions(i)``: a prompt with one of its
completions, a prompt alone, a root-to-leaf path of a prefix tree) gathered from the packed
batch and run alone through plain causal attention written here from the definition, in
float64, with no library code: a query at position i sees keys j with ``i - window < j <= i``;
scores ``q.k * scale``, then ``softcap * tanh(s / softcap)``; the head's sink is one more logit
with no value, appended after the keys. A packed token's output and lse are its values in any
sequence holding it (all must agree: checked), so gradients of a loss on the packed outputs
are the oracle's through any one holder. The same dense function (:func:`masked_attention`,
any mask, any dtype) is the oracle of the backends' inner engines (the torch backend's
engines, flash's varlen entries) and the low-precision PyTorch baseline of the GPU-only rules.

Backend runs: :data:`HOW_TO_RUN` says how each registered backend runs on this machine where
the default (float64, CPU, no context) does not do; :func:`backend_runs` walks
``backend_names("prefix_attention")``, so a new backend is tested by its registry entry
(and at most one line there).
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import pytest
import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper._dispatch import available_backends, backend_names
from prefix_grouper.attention import flash_engine, torch_backend

F64 = torch.float64
OP = "prefix_attention"
GPU = torch.cuda.is_available()
NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")


# ---------------------------------------------------------------------------- the oracle
def masked_attention(q, k, v, visible, scale, *, softcap=None, sinks=None, lse_dtype=None):
    """``(out [Lq, Hq, D], lse [Lq, Hq])`` of dense attention in the inputs' dtype (the lse in
    ``lse_dtype`` when given: the low-precision baselines take it in float32, as kernels do).

    q ``[Lq, Hq, D]``, k/v ``[Lk, Hkv, D]`` (K/V heads repeated for GQA), ``visible`` ``[Lq, Lk]``
    bool. Scores ``q.k * scale``, softcapped, masked, then a softmax over the visible keys and
    the head's sink logit (no value). A row that sees nothing (and has no sink): out 0, lse -inf.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = visible.to(scores.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype)[:, None, None].expand(-1, q.shape[0], 1)], -1)
    lse = torch.logsumexp(scores if lse_dtype is None else scores.to(lse_dtype), -1)
    probs = torch.softmax(scores, -1)[..., :k.shape[0]]
    if sinks is None:
        probs = torch.where(visible.any(1)[None, :, None], probs, 0.0)
    return torch.einsum("hqk,khd->qhd", probs, v), lse.transpose(0, 1)


def causal_visible(queries, keys, query_offset=0, window=None):
    """``[queries, keys]``: query i at key position ``query_offset + i`` sees keys
    ``query_offset + i - window < j <= query_offset + i``."""
    gap = (query_offset + torch.arange(queries))[:, None] - torch.arange(keys)[None, :]
    visible = gap >= 0
    if window is not None:
        visible &= gap < window
    return visible


def sequence_attention(q, k, v, scale, *, window=None, softcap=None, sinks=None):
    """Plain causal attention of ONE sequence ``[L, H, D]``."""
    visible = causal_visible(q.shape[0], k.shape[0], window=window)
    return masked_attention(q, k, v, visible, scale, softcap=softcap, sinks=sinks)


def per_sequence_attention(q, k, v, layout, *, softmax_scale, window=None, softcap=None, sinks=None):
    """``(out [T, Hq, D], lse [T, Hq])`` at every packed token, from every sequence of
    ``layout`` run alone through :func:`sequence_attention` (in the inputs' dtype: pass float64).
    A token several sequences hold gets the same values from each (checked); every packed
    token is in some sequence (checked)."""
    out = torch.zeros_like(q)
    lse = q.new_zeros(q.shape[:2])
    written = torch.zeros(q.shape[0], dtype=torch.bool)
    for i in range(layout.num_sequences):
        rows = layout.sequence_positions(i).cpu()
        seq_out, seq_lse = sequence_attention(q[rows], k[rows], v[rows], softmax_scale, window=window,
                                              softcap=softcap, sinks=sinks)
        again = written[rows]
        torch.testing.assert_close(seq_out.detach()[again], out.detach()[rows][again], rtol=1e-12, atol=1e-12)
        out = out.index_copy(0, rows, seq_out)
        lse = lse.index_copy(0, rows, seq_lse)
        written[rows] = True
    assert bool(written.all()), "a packed token that no sequence holds"
    return out, lse


# ---------------------------------------------------------------------------- inputs and losses
def make_inputs(layout, hq, hkv, d, *, seed=0, sinks=False, score_size=3.0):
    """float64 ``(q, k, v, sinks or None)`` and cotangents ``(grad_out, grad_lse)``. Scaled
    scores have a standard deviation of about ``score_size``: enough that softcap 2 saturates
    and the softmax is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    t = layout.total_tokens
    q = torch.randn(t, hq, d, generator=g, dtype=F64) * math.sqrt(score_size)
    k = torch.randn(t, hkv, d, generator=g, dtype=F64) * math.sqrt(score_size)
    v = torch.randn(t, hkv, d, generator=g, dtype=F64)
    sink = torch.randn(hq, generator=g, dtype=F64) * 2 if sinks else None
    cotangents = torch.randn(t, hq, d, generator=g, dtype=F64), torch.randn(t, hq, generator=g, dtype=F64)
    return (q, k, v, sink), cotangents


def outputs_and_grads(run, leaves, cotangents, *, dtype=None, device="cpu", out_only=False, lse_only=False):
    """``[out, lse, dq, dk, dv(, dsinks)]`` (on the CPU) of ``run(q, k, v, sinks)`` -> (out, lse) under the
    loss ``sum(out * grad_out) + sum(lse * grad_lse)`` (or one of the two terms; ``lse_only``:
    dv is then zero). Leaves are cast to ``dtype`` and moved to ``device`` first."""
    leaves = [None if x is None else x.detach().to(device, dtype or x.dtype).requires_grad_() for x in leaves]
    out, lse = run(*leaves)
    grad_out, grad_lse = (c.to(device) for c in cotangents)
    loss = 0
    if not lse_only:
        loss = loss + (out.double() * grad_out).sum()
    if not out_only:
        loss = loss + (lse.double() * grad_lse).sum()
    present = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, present, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, present)]
    return [x.detach().cpu() for x in (out, lse, *grads)]


def assert_all_close(actual, expected, tol, names=NAMES):
    """Every tensor within ``tol`` of the expected one, relative to that tensor's largest entry
    (at least 1): ``max |a - e| <= tol * max(1, max |e|)``."""
    assert len(actual) == len(expected)
    errors = {}
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        scale = max(1.0, e.double().abs().max().item()) if e.numel() else 1.0
        errors[name] = (a.double() - e.double()).abs().max().item() / scale if e.numel() else 0.0
    assert max(errors.values()) <= tol, errors


def oracle(layout, leaves, cotangents, features, scale, **loss):
    """:func:`outputs_and_grads` of :func:`per_sequence_attention` in float64."""
    def run(q, k, v, sinks):
        return per_sequence_attention(q, k, v, layout, softmax_scale=scale, sinks=sinks, **features)
    return outputs_and_grads(run, leaves, cotangents, dtype=F64, **loss)


# ---------------------------------------------------------------------------- trees
def random_tree_sequences(seed: int, max_run: int = 6, max_depth: int = 4, max_roots: int = 3, max_branch: int = 3,
                          vocabulary: int = 50) -> list[list[int]]:
    """Branching random walks: 1..max_roots roots, 0..max_depth levels, 1..max_branch children
    per node, runs of 0..max_run new tokens per branch (0: the child ends where its parent
    does), then exact duplicates and prefixes of others. A small vocabulary lets tokens
    repeat and merge as the radix tree says; a large one keeps every branch its own."""
    rng = random.Random(seed)
    sequences: list[list[int]] = []
    for _ in range(rng.randint(1, max_roots)):
        frontier = [[rng.randrange(vocabulary) for _ in range(rng.randint(1, max_run))]]
        for _depth in range(rng.randint(0, max_depth)):
            children = []
            for node in frontier:
                for _ in range(rng.randint(1, max_branch)):
                    children.append(node + [rng.randrange(vocabulary) for _ in range(rng.randint(0, max_run))])
            frontier = children
        sequences.extend(frontier)
    picks = [rng.choice(sequences) for _ in range(rng.randint(0, 3))]
    sequences += [list(s) for s in picks]  # exact duplicates
    sequences += [s[:rng.randint(1, len(s))] for s in picks]  # prefixes of others
    rng.shuffle(sequences)
    return sequences


def tree_depth(layout) -> int:
    """Runs on the longest root-to-segment path."""
    segmentation = layout.segmentation
    return max(len(segmentation.key_runs(s)) for s in range(len(segmentation)))


def chain_sequences(step_lens=(7, 1, 97, 1, 7, 1)) -> list[list[int]]:
    """Per-step histories: every sequence extends the previous one and branches once by a token."""
    history, sequences = [], []
    for step, step_len in enumerate(step_lens):
        history = history + [1000 * step + i for i in range(step_len)]
        sequences += [history, history + [99_000 + step]]
    return sequences


def shared_system_prompt_layout(device="cpu") -> GroupLayout:
    """``from_padded(share_across_groups=True, min_shared=1)``: a 7-token system prompt under two
    groups' different prompts (left-padded), completions of 6, 0, 9 and 2 tokens."""
    system, prompts = [5, 6, 7, 8, 9, 10, 11], ([20, 21, 22], [30, 31, 32, 33, 34])
    rows = [system + list(p) for p in prompts]
    width = max(map(len, rows))
    prompt_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    completion_mask = torch.tensor([[1] * 6 + [0] * 3, [0] * 9, [1] * 9, [1] * 2 + [0] * 7])
    layout = GroupLayout.from_padded(prompt_mask.to(device), completion_mask.to(device), [2, 2],
                                     prompt_ids=prompt_ids.to(device), share_across_groups=True, min_shared=1)
    assert len(layout.segmentation.groups) == 1 and not layout.is_flat  # one root: the system prompt
    return layout


# ---------------------------------------------------------------------------- the layouts of the matrix
@dataclass(frozen=True)
class Case:
    """A layout (built on a device) with its heads and the window its "window" feature uses."""
    build: Callable[[str], GroupLayout]
    heads: tuple[int, int, int]  # Hq, Hkv, head dim
    window: int


# Lengths 1, 7, 19/20, 33, 97 leave partial 32-row tiles and 16-key blocks under the Triton
# interpreter; windows 5, 9 and 33 straddle them, in a prompt and in a completion's own run.
CASES = {
    # One prompt, G = 3, one head of dim 80 (Triton pads it to 128); the window is the longest
    # row less one: it hides one key from that row's last query only.
    "one-level": Case(lambda device: GroupLayout.from_lengths([33], [[45, 1, 7]], device=device), (1, 1, 80),
                      33 + 45 - 1),
    # Empty completions, G = 3, 1, 4, a one-token prompt; a window of 1: each token sees itself
    # (and its sink) only.
    "ragged": Case(lambda device: GroupLayout.from_lengths([1, 7, 20], [[0, 1, 7], [19], [7, 0, 1, 19]],
                                                          device=device), (2, 2, 16), 1),
    # 7 query heads on one KV head (Triton packs them in one program: 4-token tiles, idle
    # score rows), head dim padded 24 -> 32; a prompt over three tiles.
    "gqa": Case(lambda device: GroupLayout.from_lengths([97, 5], [[1, 40], [33]], device=device), (7, 1, 24), 33),
    # Depth 6, 10 sequences over 48 tokens: duplicates, prefixes of others, runs of 0..6
    # tokens; an odd head dim, GQA.
    "tree": Case(lambda device: GroupLayout.from_sequences(random_tree_sequences(46), device=device), (4, 2, 7), 5),
    "shared-across-groups": Case(shared_system_prompt_layout, (4, 2, 16), 4),
    # Per-step histories, depth 7 (runs of 1, 7 and 97 tokens, one-token branches), MQA.
    "chain": Case(lambda device: GroupLayout.from_sequences(chain_sequences(), device=device), (3, 1, 5), 9),
}

# Feature name -> prefix_attention keywords for a case ("sinks": True draws random [Hq] sinks).
FEATURES = {
    "plain": lambda case: {},
    "window": lambda case: {"window": case.window},
    "softcap": lambda case: {"softcap": 2.0},
    "sinks": lambda case: {"sinks": True},
    "all": lambda case: {"window": case.window, "softcap": 3.0, "sinks": True},
}


# ---------------------------------------------------------------------------- how to run each backend here
def _force_chunked():
    """The torch backend's explicit-score engine, which non-CPU devices run, forced on CPU."""
    def chunked(device, window=None, softcap=None, **_):
        return torch_backend.chunked_engine(window, softcap)
    return mock.patch.object(torch_backend, "engine_for", chunked)


@dataclass(frozen=True)
class Run:
    """How one registered backend runs here: ``backend=`` name, input dtype and device, a
    context entered around the call and its backward, and the tolerance of its comparison
    with the float64 oracle (see :func:`assert_all_close`)."""
    backend: str
    dtype: torch.dtype = F64
    tol: float = 1e-10  # float64 against float64: summation order only (~1e-15 relative)
    context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    device: str = "cpu"
    name: str = ""

    @property
    def id(self) -> str:
        return self.name or self.backend

    def unavailable(self, dtype=None) -> str | None:
        """Why this run cannot run here in ``dtype`` (default its own), or None."""
        dtype = dtype or self.dtype
        with self.context():
            if self.backend == "auto" or self.backend in available_backends(OP, self.device, dtype):
                return None
        return f"backend={self.backend!r} does not run on {self.device} for {dtype} here"

    def attention(self, layout, **kwargs):
        """``run(q, k, v, sinks) -> (out, lse)`` through ``prefix_attention(backend=...)``."""
        return lambda q, k, v, sinks=None: prefix_attention(q, k, v, layout, backend=self.backend, return_lse=True,
                                                             sinks=sinks, **kwargs)


# Where the default Run(name) does not do. triton: float32 (its kernels' dtype under the
# interpreter; bfloat16 needs a GPU, float64 is refused), on the GPU where there is one; fp32
# dot products and online softmax over at most a few hundred keys of these inputs stay
# around 1e-6 of each tensor's largest entry (the worst seen: 2e-6), so 1e-4 leaves 50x while a
# key wrongly shown or hidden, or a sink left out, moves values by O(0.1). flash: on the CPU
# only through its plain-PyTorch varlen engine (any dtype). torch: both of its engines.
HOW_TO_RUN = {
    "triton": [Run("triton", torch.float32, 1e-4, device="cuda" if GPU else "cpu")],
    "flash": [Run("flash", context=lambda: flash_engine("reference"))],
    "torch": [Run("torch"), Run("torch", context=_force_chunked, name="torch-chunked")],
}


def backend_runs() -> list:
    """One ``pytest.param`` per way of running every registered backend of the op."""
    return [pytest.param(run, id=run.id) for name in backend_names(OP) for run in HOW_TO_RUN.get(name, [Run(name)])]


def skip_unless_runs(run: Run, dtype=None) -> None:
    reason = run.unavailable(dtype)
    if reason is not None:
        pytest.skip(reason)
