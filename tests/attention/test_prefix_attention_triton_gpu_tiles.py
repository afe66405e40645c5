"""backend="triton" at the GPU's tile sizes, run by the interpreter.

The interpreter normally walks 32-row tiles in 16-row inner blocks; on a GPU the schedules use
the tiles of ``triton_backend._tile_sizes`` (128 rows for 16-bit head dims up to 128, 64 at
256, 64/32 for fp32 without TF32) and the kernels inner blocks of 16-128 rows. Here both are
set to the GPU's values, so the GPU's head packing (12/2 heads: 6 heads x 21 tokens in a
128-row program, 28/4: 7 x 18), partial inner blocks, diagonals inside a 128-row tile and
the dK/dV splits of 128-key tiles run on the CPU against the float64 oracle, on
ragged one-level layouts and prefix trees, with windows, softcap and sinks.
"""
import pytest
import torch
from attention_oracle import assert_all_close, make_inputs, oracle, outputs_and_grads

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import triton_autotune, triton_backend
from prefix_grouper.runtime import triton_interpreted, triton_unavailable_reason

if not triton_interpreted() or triton_unavailable_reason(torch.device("cpu")) is not None:
    pytest.skip("runs the GPU's tiles under the Triton interpreter (a GPU runs them itself)",
                allow_module_level=True)

# fp32 kernels against float64, unit-scale inputs over a few hundred keys: the worst error
# seen over 54 such cases was 1.2e-6 (relative to the tensor's largest entry); a key block
# skipped or counted twice, or a head packed onto the wrong rows, moves values by O(0.1).
FP32_TOL = 1e-4


def _tree_layout() -> GroupLayout:
    """Depth 3: a 150-token prompt, two middles of 40 and 1 tokens, leaves of 0-130 tokens."""
    gen = torch.Generator().manual_seed(11)

    def tokens(n):
        return torch.randint(0, 50_000, (n,), generator=gen).tolist()

    prompt = tokens(150)
    first, second = prompt + tokens(40), prompt + tokens(1)
    return GroupLayout.from_sequences([first + tokens(130), first + tokens(3), first, second + tokens(97)])


def _one_level_layout() -> GroupLayout:
    """Ragged: a prompt of 1 token (G = 1), one over two 128-row tiles with an empty completion."""
    return GroupLayout.from_lengths([1, 257, 20], [[40], [0, 128, 1], [33]])


# (schedule tile, inner block, (Hq, Hkv, D)): each a launch the GPU makes (bf16 at head dims
# 128 / 64 / 256 and 96, 28/4 as Qwen2.5-7B; fp32 without TF32 at 64 and 128).
# Few heads keep the interpreter quick; the packing is the GPU's (heads per KV head).
GPU_LAUNCHES = [
    (128, 64, (12, 2, 128), "bf16-d128-gqa6-inner64"),
    (128, 32, (6, 1, 128), "bf16-d128-gqa6-inner32"),
    (128, 128, (7, 1, 64), "bf16-d64-gqa7-inner128"),
    (64, 32, (2, 1, 256), "bf16-d256-mqa-inner32"),
    (128, 64, (14, 2, 96), "bf16-d96-gqa7-inner64"),
    (64, 16, (4, 2, 64), "fp32ieee-d64-inner16"),
    (32, 16, (2, 2, 128), "fp32ieee-d128-inner16"),
]
PLAIN, ALL_FEATURES = {}, {"window": 70, "softcap": 3.0, "sinks": True}


def _cases():
    """Every launch on both layouts, with the features on one of them (alternating)."""
    for index, (tile, inner, heads, name) in enumerate(GPU_LAUNCHES):
        featured = "tree" if index % 2 == 0 else "one_level"
        for layout_kind in ("one_level", "tree"):
            features = ALL_FEATURES if layout_kind == featured else PLAIN
            yield pytest.param(tile, inner, heads, layout_kind, features,
                               id=f"{name}-{layout_kind}-{'window-softcap-sinks' if features else 'plain'}")


@pytest.mark.parametrize("tile, inner, heads, layout_kind, features", list(_cases()))
def test_prefix_attention_triton_gpu_tiles_match_oracle(monkeypatch, tile, inner, heads, layout_kind, features):
    monkeypatch.setattr(triton_backend, "_tile_sizes", lambda head_dim, dtype: (tile, tile))
    monkeypatch.setattr(triton_autotune, "INTERPRETER_INNER_BLOCK", inner)
    layout = _one_level_layout() if layout_kind == "one_level" else _tree_layout()
    features = dict(features)
    leaves, cotangents = make_inputs(layout, *heads, seed=0, sinks=features.pop("sinks", False), score_size=1.0)
    scale = heads[2] ** -0.5

    def triton(q, k, v, sinks):
        return prefix_attention(q, k, v, layout, softmax_scale=scale, sinks=sinks, backend="triton",
                                return_lse=True, **features)

    measured = outputs_and_grads(triton, leaves, cotangents, dtype=torch.float32, out_only=True)
    assert_all_close(measured, oracle(layout, leaves, cotangents, features, scale, out_only=True), FP32_TOL)


def test_prefix_attention_triton_gpu_tiles_are_in_effect(monkeypatch):
    """The patch reaches the launch: 21-token tiles (6 packed heads in 128 rows) schedule the
    one-level layout into fewer query programs than the interpreter's 5-token tiles."""
    layout = _one_level_layout()
    q = torch.zeros(layout.total_tokens, 12, 128)
    interpreter_tiles, _, packing = triton_backend._query_schedule(layout.host_segments, q, 2, None)
    monkeypatch.setattr(triton_backend, "_tile_sizes", lambda head_dim, dtype: (128, 128))
    gpu_tiles, _, gpu_packing = triton_backend._query_schedule(layout.host_segments, q, 2, None)
    assert (packing.tile_tokens, gpu_packing.tile_tokens) == (5, 21)
    assert gpu_tiles.shape[0] < interpreter_tiles.shape[0]
