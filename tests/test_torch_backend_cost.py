"""The torch backend's cost at 2 x (2048 + 16 x 1024) tokens on CPU (issue 9's check).

2 groups, prompts of 2048 tokens, 16 completions of 1024 each (T = 36,864 packed tokens,
98,304 in the unpacked rows), Hq = 4, Hkv = 2, D = 32, float32, fwd+bwd of ``out.sum()``.

* Memory: peak RSS growth of a fresh process over one cold fwd+bwd of ``out`` and ``lse``
  (layout plan included; the LSE's gradient is the costlier backward) must stay within
  ``MEMORY_PER_INPUT_BYTE`` times the bytes of q, k and v plus ``MEMORY_SLACK``: linear in
  tokens. What lives at once is O(1) copies of q/k/v, the outputs and the gradients
  (measured: about 8x the q/k/v bytes). The backend this replaced held [B, Q_max, P_max]
  score matrices with the LSE (6.9 GiB here) and a per-completion copy of the prompt's
  K/V with a [N, S_max, P_max + S_max] mask without it (760 MiB, over the bound).
  The same bound holds with a window, softcap and sinks (the explicit-score engine's
  chunks of ``CPU_SCORE_BLOCK_BYTES`` add a constant).
* Time: best of 3 interleaved fwd+bwd runs, no slower than the unpacked rows through SDPA
  (``prefix_grouper.unpacked.unpacked_prefix_attention``) times ``TIME_MARGIN``. The
  attention work is 1.7x smaller than the unpacked rows' (measured about 2x faster when
  the machine is quiet); the margin absorbs a shared, loaded machine.
* Prefix trees (a system prompt of 2048 tokens shared by 4 questions of 128, each with 4
  completions of 256; T = 6,656 packed tokens, 38,912 in the sequences, 3.7x less
  attention work): the same memory bound, and fwd+bwd no slower than the sequences run
  alone through SDPA (padded to the longest, causal) times ``TIME_MARGIN`` (measured
  1.7x faster on 2 shared cores).
* Never more memory than the unpacked rows run one SDPA call per row (issue 27): peak extra
  resident memory of one fwd+bwd, in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (so
  that the resident size follows live memory), at most the looped rows' on the issue's two
  memory shapes (8 heads of 64, fp32; measured 34 against 40 MiB and 54 against 156 MiB).
* A window saves time, not only masks: on one thread, a window of 128 with a softcap runs
  fwd+bwd in at most ``WINDOW_TIME_RATIO`` of the softcap alone's time (the key chunks
  outside the window are skipped: about 8x less score work here, measured 4-5x faster).
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.unpacked import unpacked_prefix_attention

PREFIX_LENS, SUFFIX_LENS = [2048, 2048], [[1024] * 16] * 2
HQ, HKV, HEAD_DIM = 4, 2, 32
MEMORY_PER_INPUT_BYTE = 12
MEMORY_SLACK = 64 * 2**20  # allocator, thread-local kernel buffers, the layout's index tables
TIME_MARGIN = 1.25
WINDOW_TIME_RATIO = 0.5
# prefix_attention keywords of the memory check, as source for its fresh process
FEATURES = {"none": "{}",
            "window-softcap-sinks": "dict(window=256, softcap=30.0, sinks=torch.zeros(HQ, requires_grad=True))"}


def tree_sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, 1000, (2048,), generator=g)
    questions = [torch.randint(0, 1000, (128,), generator=g) for _ in range(4)]
    return [torch.cat([system, question, torch.randint(0, 1000, (256,), generator=g)])
            for question in questions for _ in range(4)]


def inputs(tree: bool = False):
    layout = (GroupLayout.from_sequences(tree_sequences()) if tree
              else GroupLayout.from_lengths(PREFIX_LENS, SUFFIX_LENS))
    g = torch.Generator().manual_seed(0)
    return layout, [torch.randn(layout.total_tokens, heads, HEAD_DIM, generator=g).requires_grad_()
                    for heads in (HQ, HKV, HKV)]


MEMORY_SCRIPT = """
import json, resource, torch
from test_torch_backend_cost import HQ, inputs
from prefix_grouper import prefix_attention
layout, (q, k, v) = inputs(tree={tree})
features = {features}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, lse = prefix_attention(q, k, v, layout, backend="torch", return_lse=True, **features)
(out.sum() + lse.sum()).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"extra_bytes": (after - before) * 1024}}))
"""


@pytest.mark.parametrize("tree", [False, True], ids=["one-level", "tree"])
@pytest.mark.parametrize("features", list(FEATURES))
def test_peak_memory_is_linear_in_tokens(features, tree):
    # ru_maxrss is the process's high-water mark (KiB on Linux): a fresh process measures
    # this call alone, without tracemalloc (which does not see torch's allocations).
    script = MEMORY_SCRIPT.format(features=FEATURES[features], tree=tree)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=__file__.rsplit("/", 1)[0])
    assert result.returncode == 0, result.stderr[-3000:]
    extra = json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]
    layout, qkv = inputs(tree)
    input_bytes = sum(x.numel() * x.element_size() for x in qkv)
    bound = MEMORY_PER_INPUT_BYTE * input_bytes + MEMORY_SLACK
    assert extra <= bound, f"peak extra memory {extra / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"


def test_fwd_bwd_no_slower_than_unpacked_rows():
    layout, (q, k, v) = inputs()
    best = fastest_fwd_bwd({"torch": lambda: prefix_attention(q, k, v, layout, backend="torch"),
                            "unpacked": lambda: unpacked_prefix_attention(q, k, v, layout)})
    assert best["torch"] <= TIME_MARGIN * best["unpacked"], best


def fastest_fwd_bwd(providers: dict) -> dict:
    """Each provider's fastest forward + backward of ``sum()`` of 3, the providers interleaved
    so that a burst of load elsewhere hits all of them."""
    best = dict.fromkeys(providers, float("inf"))
    for _ in range(3):
        for name, run in providers.items():
            start = time.perf_counter()
            run().sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def sequences_through_sdpa(q, k, v, layout):
    """Every sequence of a tree alone: its tokens gathered, padded to the longest, causal SDPA."""
    rows = [layout.sequence_positions(i) for i in range(layout.num_sequences)]
    index = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # right padding: causal keeps it unseen
    gathered = [x[index].transpose(1, 2) for x in (q, k, v)]  # [N, H, L, D]
    return torch.nn.functional.scaled_dot_product_attention(*gathered, is_causal=True, enable_gqa=True)


def test_tree_fwd_bwd_no_slower_than_sequences():
    layout, (q, k, v) = inputs(tree=True)
    assert layout.total_tokens == 2048 + 4 * 128 + 16 * 256
    best = fastest_fwd_bwd({"torch": lambda: prefix_attention(q, k, v, layout, backend="torch"),
                            "sequences": lambda: sequences_through_sdpa(q, k, v, layout)})
    assert best["torch"] <= TIME_MARGIN * best["sequences"], best


def test_window_saves_time():
    layout = GroupLayout.from_lengths([2048], [[1024] * 2])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.total_tokens, heads, HEAD_DIM, generator=g).requires_grad_()
               for heads in (HQ, HKV, HKV))
    runs = {"softcap": {"softcap": 30.0}, "window-softcap": {"window": 128, "softcap": 30.0}}
    best = dict.fromkeys(runs, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared machine's contended threads time the contention
    try:
        for _ in range(2):  # interleaved, so a burst of load elsewhere hits both
            for name, features in runs.items():
                start = time.perf_counter()
                prefix_attention(q, k, v, layout, backend="torch", **features).sum().backward()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best["window-softcap"] <= WINDOW_TIME_RATIO * best["softcap"], best


LOOPED_MEMORY_SCRIPT = """
import ctypes, sys, torch
import torch.nn.functional as F
from prefix_grouper import GroupLayout, prefix_attention
torch.set_num_threads(1)
layout = GroupLayout.from_lengths({prefix_lens}, {suffix_lens})
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(layout.total_tokens, 8, 64, generator=g) for _ in range(3))
if sys.argv[1] == "looped":  # each sequence's rows [L, H, D], held as a model would hold them
    rows = [[x[layout.sequence_positions(i)].contiguous().requires_grad_() for i in range(layout.num_sequences)]
            for x in (q, k, v)]
    grads = [torch.randn_like(x) for x in rows[0]]
    def step():
        outs = [F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in xs), is_causal=True)[0]
                for xs in zip(*rows)]
        torch.autograd.backward([o.transpose(0, 1) for o in outs], grads)
else:
    leaves = [x.requires_grad_() for x in (q, k, v)]
    grad = torch.randn_like(q)
    def step():
        prefix_attention(*leaves, layout, backend="torch").backward(grad)
def kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = kib("VmRSS")
step()
print((kib("VmHWM") - base) * 1024)
"""


@pytest.mark.parametrize("prefix_lens, suffix_lens", [([256] * 2, [[256] * 4] * 2), ([1024] * 2, [[128] * 8] * 2)],
                         ids=["2xP256-G4-S256", "2xP1024-G8-S128"])
def test_peak_memory_no_more_than_looped_rows(prefix_lens, suffix_lens):
    script = LOOPED_MEMORY_SCRIPT.format(prefix_lens=prefix_lens, suffix_lens=suffix_lens)
    extra = {}
    for approach in ("torch", "looped"):
        result = subprocess.run([sys.executable, "-c", script, approach], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert result.returncode == 0, result.stderr[-3000:]
        extra[approach] = int(result.stdout.split()[-1])
    assert extra["torch"] <= extra["looped"], {name: f"{b / 2**20:.1f} MiB" for name, b in extra.items()}
