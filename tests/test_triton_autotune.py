"""The Triton kernels' autotuning: the register-budget candidates by default, the whole sweep
on request, one fixed config with no sweep when it is off."""
import os

import pytest

pytest.importorskip("triton")

from prefix_grouper.attention import triton_autotune  # noqa: E402
from prefix_grouper.attention.triton_bwd import (  # noqa: E402
    _prefix_attention_dkdv_tuned, _prefix_attention_dq_tuned, prefix_attention_dkdv_kernel,
)
from prefix_grouper.attention.triton_fwd import _prefix_attention_fwd_tuned, prefix_attention_fwd_kernel  # noqa: E402


def test_default_space_is_eight_warp_candidates(monkeypatch):
    monkeypatch.delenv(triton_autotune.AUTOTUNE_ENV, raising=False)
    assert triton_autotune.autotune_mode() == "quick"
    assert triton_autotune.autotune_space() == ((32, 64, 128), (8,), (3,))


def test_off_mode_builds_the_quick_candidates(monkeypatch):
    # The tuned kernels still exist when tuning is off (launchable just does not use them).
    monkeypatch.setenv(triton_autotune.AUTOTUNE_ENV, "off")
    assert triton_autotune.autotune_space() == ((32, 64, 128), (8,), (3,))


@pytest.mark.skipif(os.environ.get(triton_autotune.AUTOTUNE_ENV) == "full", reason="built with the full sweep")
def test_each_kernel_tries_its_own_stages():
    # The kernels were built at import, from the quick space ("off" builds it too).
    assert {c.num_stages for c in _prefix_attention_fwd_tuned.configs} == {3}
    assert {c.num_stages for c in _prefix_attention_dq_tuned.configs} == {3}
    assert {c.num_stages for c in _prefix_attention_dkdv_tuned.configs} == {2, 3}
    assert triton_autotune.autotune_space((2, 3)) == ((32, 64, 128), (8,), (2, 3))


def test_full_space_on_request(monkeypatch):
    monkeypatch.setenv(triton_autotune.AUTOTUNE_ENV, "full")
    sizes, warps, stages = triton_autotune.autotune_space()
    assert len(sizes) * len(warps) * len(stages) == 24


def test_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(triton_autotune.AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match="PREFIX_GROUPER_AUTOTUNE"):
        triton_autotune.autotune_mode()


@pytest.mark.parametrize("tile, head_dim_pad, precision, expected", [
    (128, 128, "tf32", {32, 64}),  # 128 * 128 is over the register budget
    (128, 64, "tf32", {32, 64, 128}),
    (128, 256, "tf32", {32}),
    (64, 128, "tf32", {32, 64}),
    (32, 128, "tf32", {32}),
    (16, 128, "tf32", {16}),  # a tile shorter than every candidate gets itself
    (64, 512, "tf32", {16}),  # nothing inside the budget: the smallest dividing block
    (64, 64, "ieee", {16}),  # fp32 FMA dots: an eighth of the budget
    (32, 128, "ieee", {16}),
    (128, 32, "ieee", {32}),
])
def test_pruning_keeps_dividing_candidates_inside_the_register_budget(tile, head_dim_pad, precision, expected):
    # The forward's inner block is BLOCK_N; its tile argument is BLOCK_M.
    prune = _prefix_attention_fwd_tuned.early_config_prune
    kept = prune(_prefix_attention_fwd_tuned.configs, {"BLOCK_M": tile, "HEAD_DIM_PAD": head_dim_pad,
                                                       "DOT_PRECISION": precision})
    assert {c.kwargs["BLOCK_N"] for c in kept} == expected
    assert all(c.num_warps == 8 and c.num_stages == 3 for c in kept)


@pytest.mark.parametrize("head_dim_pad, tile, precision, expected", [
    (128, 128, "tf32", 64), (64, 128, "tf32", 64), (256, 64, "tf32", 32), (16, 128, "tf32", 64), (128, 32, "tf32", 32),
    (64, 64, "ieee", 16), (128, 32, "ieee", 16), (32, 128, "ieee", 32), (256, 16, "ieee", 16)])
def test_fixed_inner_block_divides_the_tile_within_the_budget(head_dim_pad, tile, precision, expected):
    inner = triton_autotune.fixed_inner_block(head_dim_pad, tile, precision)
    assert inner == expected and tile % inner == 0


def test_off_mode_launches_the_plain_kernel_with_fixed_options(monkeypatch):
    monkeypatch.setenv(triton_autotune.AUTOTUNE_ENV, "off")
    monkeypatch.setattr(triton_autotune, "triton_interpreted", lambda: False)
    kernel, fixed = triton_autotune.launchable(prefix_attention_fwd_kernel, _prefix_attention_fwd_tuned, "BLOCK_N",
                                             128, 128, "tf32")
    assert kernel is prefix_attention_fwd_kernel
    assert fixed == {"BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    kernel, fixed = triton_autotune.launchable(prefix_attention_dkdv_kernel, _prefix_attention_dkdv_tuned, "BLOCK_M",
                                             256, 64, "tf32", fixed_stages=2)
    assert fixed == {"BLOCK_M": 32, "num_warps": 8, "num_stages": 2}
    monkeypatch.setenv(triton_autotune.AUTOTUNE_ENV, "quick")
    assert triton_autotune.launchable(prefix_attention_fwd_kernel, _prefix_attention_fwd_tuned, "BLOCK_N",
                                    128, 128, "tf32") == (_prefix_attention_fwd_tuned, {})


@pytest.mark.parametrize("head_dim, dtype, tf32, expected", [
    (128, "bfloat16", False, 128), (64, "float32", True, 128), (64, "float32", False, 64),
    (128, "float32", False, 32), (256, "float32", False, 16), (256, "float16", False, 64), (80, "float16", False, 128)])
def test_gpu_tiles_narrow_with_row_width_and_fp32_fma_dots(monkeypatch, head_dim, dtype, tf32, expected):
    import torch

    from prefix_grouper.attention import triton_backend

    monkeypatch.setattr(triton_backend, "triton_interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "dot_precision", lambda dt: "tf32" if tf32 or dt != torch.float32 else "ieee")
    assert triton_backend._tile_sizes(head_dim, getattr(torch, dtype)) == (expected, expected)
