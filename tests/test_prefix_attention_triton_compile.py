"""The shared-prefix attention kernels compile to PTX for sm_90 with no GPU present.

CI runs the kernels through the interpreter, which accepts code the GPU compiler rejects
(type changes across loop iterations, layouts tl.dot cannot take); compiling the bf16
head-dim-128 specialization of every kernel, plain and with the window, softcap and sinks
switched on, catches those, and the matmul kernels must use Hopper's wgmma. Runs in a subprocess because
compiling needs triton imported without TRITON_INTERPRET.
"""
import pytest

from conftest import assert_compiles_for_sm90

pytest.importorskip("triton")

COMPILE_KERNELS = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prefix_grouper.attention.triton_bwd import (delta_kernel, dkdv_reduce_kernel,
                                                 prefix_attention_dkdv_kernel, prefix_attention_dq_kernel)
from prefix_grouper.attention.triton_fwd import prefix_attention_fwd_kernel

FP32_POINTERS = {"lse_ptr", "delta_ptr", "dlse_ptr", "dk_partial_ptr", "dv_partial_ptr", "sinks_ptr"}
FP32_SCALARS = {"softmax_scale", "score_scale", "softcap_log2"}


def signature(kernel, constants):
    # Argument types follow the naming convention of the kernels: tensors of the input
    # dtype, fp32 statistics, int32 tile schedules and runs table, int32 sizes and strides.
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name.endswith(("tiles_ptr", "runs_ptr")):
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*bf16"
        else:
            types[name] = "fp32" if name in FP32_SCALARS else "i32"
    return types


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
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap autotuners/heuristics
        kernel = kernel.fn
    constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature(kernel, constants), constexprs=constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "ld.global" in ptx, kernel
    if kernel.fn.__name__ not in ("delta_kernel", "dkdv_reduce_kernel"):  # those have no matmul
        # Hopper's asynchronous warpgroup MMA, not the Ampere mma.sync path.
        assert "wgmma.mma_async" in ptx, (kernel, constants)
print("compiled")
"""


def test_attention_kernels_compile_for_sm90():
    assert_compiles_for_sm90(COMPILE_KERNELS, timeout=900)
