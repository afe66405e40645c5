"""The Triton kernels' autotuning space: small by default, the whole sweep on request."""
import pytest

pytest.importorskip("triton")

from prefix_grouper.attention import triton_common  # noqa: E402
from prefix_grouper.attention.triton_fwd import _prefix_attention_fwd_tuned  # noqa: E402


def test_default_space_is_the_hopper_candidates(monkeypatch):
    monkeypatch.delenv(triton_common.AUTOTUNE_ENV, raising=False)
    sizes, warps, stages = triton_common.autotune_space()
    assert (sizes, warps, stages) == ((64, 128), (4, 8), (3,))


def test_full_space_on_request(monkeypatch):
    monkeypatch.setenv(triton_common.AUTOTUNE_ENV, "full")
    sizes, warps, stages = triton_common.autotune_space()
    assert len(sizes) * len(warps) * len(stages) == 24


def test_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(triton_common.AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match="PREFIX_GROUPER_AUTOTUNE"):
        triton_common.autotune_space()


@pytest.mark.parametrize("tile, expected", [(128, {64, 128}), (64, {64}), (32, {16})])
def test_pruning_keeps_dividing_candidates(tile, expected):
    # The forward's inner block is BLOCK_N; its tile argument is BLOCK_M.
    prune = _prefix_attention_fwd_tuned.early_config_prune
    kept = prune(_prefix_attention_fwd_tuned.configs, {"BLOCK_M": tile})
    assert {c.kwargs["BLOCK_N"] for c in kept} == expected
    assert len(kept) == len(expected) * 2  # 4 and 8 warps, 3 stages
