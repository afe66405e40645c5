"""The advantage Triton kernel compiles to PTX for sm_90 with no GPU present.

The interpreter (how CI runs the kernel) accepts code the compiler rejects, e.g. type
mismatches across loop iterations; compiling every specialization catches those. The
interpreter also keeps Python float arguments exact, so only the PTX shows whether ``eps``
reaches the float64 specialization as an fp64 parameter (an fp32 one rounds eps=1e-4 by
2.5e-12, visible in float64 advantages of groups with a small std).
"""
import pytest

from conftest import assert_compiles_for_sm90

pytest.importorskip("triton")

COMPILE_ALL_SPECIALIZATIONS = r"""
import itertools
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from prefix_grouper.advantages.triton_impl import group_normalize_kernel

# The type the launcher gives eps, a Python float: the parameter's annotation, else fp32.
eps_param = next(param for param in group_normalize_kernel.params if param.name == "eps")
eps_type = eps_param.annotation_type or mangle_type(1e-6)
for dtype, has_perm, scale, raw in itertools.product(["*fp32", "*fp64"], [True, False], [0, 1, 2], [True, False]):
    signature = dict(values_ptr=dtype, perm_ptr="*i64", offsets_ptr="*i64", batch_scale_ptr=dtype,
                     out_ptr=dtype, num_groups="i32", eps=eps_type)
    constants = dict(HAS_PERM=has_perm, SCALE=scale, UNBIASED=True, SINGLETON_RAW=raw,
                     GROUPS_PER_PROGRAM=64, BLOCK=16)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=group_normalize_kernel, signature=signature, constexprs=constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "ld.global" in ptx
    # Parameter 6 is eps (5 pointers, then num_groups): it must be a 64-bit float, and the
    # float64 specialization must never widen an fp32 value.
    assert re.search(r"\.param \.f64 \w+_param_6\b", ptx), "eps is not an fp64 parameter"
    if dtype == "*fp64":
        assert "cvt.f64.f32" not in ptx, "an fp32 value is widened in the float64 kernel"
        assert not re.search(r"\b(sqrt|div)\.approx\.f", ptx), "approximate op in the float64 kernel"
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    assert_compiles_for_sm90(COMPILE_ALL_SPECIALIZATIONS, timeout=300)
