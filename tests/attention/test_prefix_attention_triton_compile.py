"""The shared-prefix attention kernels compile to PTX for sm_90 with no GPU present.

CI runs the kernels through the interpreter, which accepts code the GPU compiler rejects
(type changes across loop iterations, layouts tl.dot cannot take); compiling the bf16
head-dim-128 specialization of every kernel, plain and with the window, softcap and sinks
switched on (and the fp32 forward and dK/dV without TF32 at their tiles), catches those,
and the bf16 matmul kernels must use Hopper's wgmma. Runs in a subprocess because
compiling needs triton imported without TRITON_INTERPRET.
"""
from pathlib import Path

import pytest

from conftest import assert_compiles_for_sm90

pytest.importorskip("triton")

COMPILE_KERNELS = r"""
import sys
sys.path.insert(0, SCRIPTS)
from sm90_kernel_report import compile_sm90, jit_function
from prefix_grouper.attention.triton_bwd import (delta_kernel, dkdv_reduce_kernel,
                                                 prefix_attention_dkdv_kernel, prefix_attention_dq_kernel)
from prefix_grouper.attention.triton_fwd import prefix_attention_fwd_kernel

plain = dict(HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_SINKS=False)
every_feature = dict(HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_SINKS=True)
tile = dict(HEAD_DIM=128, HEAD_DIM_PAD=128, CHECK_DIMS=False, DOT_PRECISION="tf32")
mha = dict(tile, BLOCK_M=128, TILE_TOKENS=128, HEADS_PER_PROGRAM=1, BLOCK_N=64)
gqa_6 = dict(tile, BLOCK_M=128, TILE_TOKENS=21, HEADS_PER_PROGRAM=6, BLOCK_N=64)  # 12/2 heads
dkdv = dict(tile, BLOCK_M=64, BLOCK_N=128)
for kernel, constants in [
    (prefix_attention_fwd_kernel, dict(mha, **plain)),
    (prefix_attention_fwd_kernel, dict(gqa_6, **plain)),
    (prefix_attention_dq_kernel, dict(gqa_6, **plain)),
    (prefix_attention_dkdv_kernel, dict(dkdv, **plain)),
    (prefix_attention_fwd_kernel, dict(mha, **every_feature)),
    (prefix_attention_fwd_kernel, dict(mha, HAS_WINDOW=True, HAS_SOFTCAP=False, HAS_SINKS=False)),
    (prefix_attention_dq_kernel, dict(gqa_6, **every_feature)),
    (prefix_attention_dkdv_kernel, dict(dkdv, **every_feature)),
    (dkdv_reduce_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_N=128)),
    (delta_kernel, dict(HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_T=64, HAS_DLSE=True)),
]:
    ptx = compile_sm90(kernel, constants, num_warps=8, num_stages=3).asm["ptx"]
    assert "ld.global" in ptx, kernel
    if jit_function(kernel).fn.__name__ not in ("delta_kernel", "dkdv_reduce_kernel"):  # those have no matmul
        # Hopper's asynchronous warpgroup MMA, not the Ampere mma.sync path.
        assert "wgmma.mma_async" in ptx, (kernel, constants)
# fp32 without TF32 at its GPU tiles (head dim 64: 64-row tiles, 16-row inner blocks): FMA
# dots, no wgmma.
fp32 = dict(HEAD_DIM=64, HEAD_DIM_PAD=64, CHECK_DIMS=False, DOT_PRECISION="ieee", **plain)
for kernel, constants in [
    (prefix_attention_fwd_kernel, dict(fp32, BLOCK_M=64, TILE_TOKENS=64, HEADS_PER_PROGRAM=1, BLOCK_N=16)),
    (prefix_attention_dkdv_kernel, dict(fp32, BLOCK_M=16, BLOCK_N=64)),
]:
    assert "ld.global" in compile_sm90(kernel, constants, num_warps=8, num_stages=2, dtype="fp32").asm["ptx"]
print("compiled")
"""


def test_prefix_attention_triton_kernels_compile_for_sm90():
    scripts = str(Path(__file__).resolve().parents[2] / "scripts")
    assert_compiles_for_sm90(COMPILE_KERNELS.replace("SCRIPTS", repr(scripts)), timeout=900)
