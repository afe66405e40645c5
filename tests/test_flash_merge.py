"""prefix_grouper.attention.flash_merge: the LSE merge and the row sums of backend="flash".

The PyTorch fallback is checked on CPU against an independent float64 computation (every part
spread over all rows, -inf where it does not reach, then one logsumexp); the built extension's
ops, fakes and SASS without a GPU; the CUDA ops against the fallback only on a GPU.
"""
import os
import shutil
import subprocess

import pytest
import torch

import prefix_grouper
from prefix_grouper._extension import cuda_extension_available
from prefix_grouper.attention.flash_merge import merge_partials, sum_partials

INF = float("inf")


def eps(dtype):
    """The dtype's machine epsilon: the most one ulp can be, relative to the value (rounding to
    the dtype moves a value by at most half of it)."""
    return torch.finfo(dtype).eps


needs_extension = pytest.mark.skipif(not cuda_extension_available(),
                                     reason="prefix_grouper._C is not built (no nvcc, a CPU torch, or "
                                            "PREFIX_GROUPER_SKIP_CUDA_BUILD)")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_extension_available()),
                               reason="needs a GPU and the built extension")

# Overlapping, partial and empty parts over 29 rows; rows 17, 18 and 26-28 are covered by none,
# and every part covering ALL_MASKED_ROW has lse -inf (and out NaN) there.
SPANS = [(0, 13), (6, 11), (6, 11), (20, 0), (19, 7)]
TOTAL_ROWS = 29
UNCOVERED_ROWS = [17, 18, 26, 27, 28]
ALL_MASKED_ROW = 2
# 14 more parts within rows 0-16, for the GPU tests: 5, 9 and 19 parts take 1, 2 and 3 launches
# of at most 8 parts (csrc/attention_merge.h), the later ones folding in the running result.
MANY_SPANS = SPANS + [(index % 14, 1 + index % 3) for index in range(14)]


def random_parts(generator, spans, heads, dim, dtype, strided=False, device="cpu"):
    """``(row_start, out [R, H, D] of dtype, lse [H, R] float32)`` per ``(row_start, R)`` of
    ``spans``, lse -inf (and out NaN) at about a fifth of the (row, head) pairs and at every pair
    of ALL_MASKED_ROW. ``strided``: out a slice of a wider tensor, lse a transposed view."""
    parts = []
    for start, rows in spans:
        # Moved to the device before slicing: .to() would make a slice contiguous.
        out = torch.randn(rows, heads, dim + 3, generator=generator).to(device, dtype)[..., :dim]
        lse = torch.randn(rows, heads, generator=generator) * 3
        empty = torch.rand(rows, heads, generator=generator) < 0.2
        if start <= ALL_MASKED_ROW < start + rows:
            empty[ALL_MASKED_ROW - start] = True
        lse[empty] = -INF
        out[empty.to(device)] = float("nan")
        out, lse = (out, lse.to(device).t()) if strided else (out.contiguous(), lse.t().contiguous().to(device))
        parts.append((start, out, lse))
    return parts


def reference_merge(parts, total_rows, sinks=None):
    """float64 ``(out, lse)``: every part spread over all rows, -inf where it does not reach."""
    heads, dim = parts[0][1].shape[1:]
    lse_all = torch.full((len(parts) + 1, total_rows, heads), -INF, dtype=torch.float64)
    out_all = torch.zeros((len(parts) + 1, total_rows, heads, dim), dtype=torch.float64)
    for index, (start, out, lse) in enumerate(parts):
        lse_all[index, start:start + out.shape[0]] = lse.t().cpu().double()
        out_all[index, start:start + out.shape[0]] = out.cpu().double()
    if sinks is not None:
        lse_all[-1] = sinks.cpu().double()  # a term with no value
    lse = torch.logsumexp(lse_all, dim=0)
    weights = torch.exp(lse_all - lse)[..., None]
    return torch.where((lse_all == -INF)[..., None], 0, weights * out_all).sum(0), lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("dim", [1, 7, 97, 128])
@pytest.mark.parametrize("heads", [1, 3])
def test_merge_partials_matches_float64(generator, heads, dim, strided, with_sinks, dtype):
    parts = random_parts(generator, SPANS, heads, dim, dtype, strided=strided)
    sinks = torch.randn(heads, generator=generator).to(torch.bfloat16) if with_sinks else None
    out, lse = merge_partials(parts, TOTAL_ROWS, sinks=sinks, implementation="torch")
    expected_out, expected_lse = reference_merge(parts, TOTAL_ROWS, sinks)

    assert out.shape == (TOTAL_ROWS, heads, dim) and out.dtype == dtype
    assert lse.shape == (TOTAL_ROWS, heads) and lse.dtype == torch.float32
    assert torch.isfinite(out).all()  # NaN outs under -inf lses never leak
    torch.testing.assert_close(out.double(), expected_out, rtol=eps(dtype), atol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-5)
    for row in UNCOVERED_ROWS + [ALL_MASKED_ROW]:
        assert (out[row] == 0).all()
        expected = torch.full((heads,), -INF) if sinks is None else sinks.float()
        assert torch.equal(lse[row], expected)  # exactly the sink where it is the only term


def test_merge_partials_float64_mixed_dtypes_and_out_dtype(generator):
    parts = random_parts(generator, SPANS, 3, 7, torch.float64)
    parts[1] = (parts[1][0], parts[1][1].to(torch.bfloat16), parts[1][2])
    parts[2] = (parts[2][0], parts[2][1], parts[2][2].float())
    sinks = torch.randn(3, generator=generator, dtype=torch.float64)
    out, lse = merge_partials(parts, TOTAL_ROWS, sinks=sinks, out_dtype=torch.float32)
    expected_out, expected_lse = reference_merge(parts, TOTAL_ROWS, sinks)
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    torch.testing.assert_close(out.double(), expected_out, rtol=eps(torch.float32), atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_merge_partials_zero_rows():
    out, lse = merge_partials([(0, torch.zeros(0, 2, 5), torch.zeros(2, 0))], 0, sinks=torch.zeros(2))
    assert out.shape == (0, 2, 5) and lse.shape == (0, 2)


def reference_sum(parts, total_rows):
    total = torch.zeros((total_rows, *parts[0][1].shape[1:]), dtype=torch.float64)
    for start, x in parts:
        total[start:start + x.shape[0]] += x.cpu().double()
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 7, 97, 128])
@pytest.mark.parametrize("heads", [1, 3])
def test_sum_partials_matches_float64(generator, heads, dim, dtype):
    parts = [(start, torch.randn(rows, heads, dim + 3, generator=generator).to(dtype)[..., :dim])
             for start, rows in SPANS]
    total = sum_partials(parts, TOTAL_ROWS, implementation="torch")
    assert total.shape == (TOTAL_ROWS, heads, dim) and total.dtype == dtype
    # At most three float32 additions per element before the one rounding to dtype.
    torch.testing.assert_close(total.double(), reference_sum(parts, TOTAL_ROWS), rtol=eps(dtype),
                               atol=1e-6 if dtype != torch.float64 else 1e-12)
    assert (total[UNCOVERED_ROWS] == 0).all()


def test_sum_partials_accumulates_bfloat16_in_float32():
    # bfloat16 holds 256 and 264 but not 257: added one by one in bfloat16, every +1 rounds away.
    parts = [(0, torch.full((1, 1, 1), 256.0, dtype=torch.bfloat16))]
    parts += [(0, torch.ones(1, 1, 1, dtype=torch.bfloat16)) for _ in range(8)]
    naive = parts[0][1].clone()
    for _, x in parts[1:]:
        naive += x
    assert naive.item() == 256
    total = sum_partials(parts, 1)
    assert total.dtype == torch.bfloat16 and total.item() == 264
    assert sum_partials(parts, 1, dtype=torch.float32).item() == 264


def _part(rows=4, heads=2, dim=3, device="cpu"):
    return torch.zeros(rows, heads, dim, device=device)


@pytest.mark.parametrize("call, message", [
    (lambda: merge_partials([], 4), "parts is empty"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4))], -1), "total_rows must be >= 0"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4))], 3), r"covers rows \[0, 4\)"),
    (lambda: merge_partials([(-1, _part(), torch.zeros(2, 4))], 8), r"covers rows \[-1, 3\)"),
    (lambda: merge_partials([(0, torch.zeros(4, 6), torch.zeros(2, 4))], 4), r"must be \[R, H, D\]"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4)), (0, _part(heads=3), torch.zeros(3, 4))], 4),
     "part 1 must be"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4)), (0, _part(dim=5), torch.zeros(2, 4))], 4),
     "part 1 must be"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4, device="meta"))], 4), "lse must be"),
    (lambda: merge_partials([(0, _part(), torch.zeros(4, 2))], 4), r"lse must be a floating \[H, R\] = \[2, 4\]"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4))], 4, sinks=torch.zeros(3)), "sinks must be"),
    (lambda: merge_partials([(0, _part(), torch.zeros(2, 4))], 4, implementation="triton"), "implementation"),
    (lambda: sum_partials([], 4), "parts is empty"),
    (lambda: sum_partials([(0, _part()), (1, _part())], 4), r"part 1 covers rows \[1, 5\)"),
    (lambda: sum_partials([(0, _part()), (0, _part(device="meta"))], 4), "part 1 must be"),
    (lambda: sum_partials([(0, _part())], 4, implementation="fast"), "implementation"),
])
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cuda_implementation_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match=r"merge_partials\(implementation='cuda'\)"):
        merge_partials([(0, _part(), torch.zeros(2, 4))], 4, implementation="cuda")
    with pytest.raises(RuntimeError, match=r"sum_partials\(implementation='cuda'\)"):
        sum_partials([(0, _part())], 4, implementation="cuda")


@needs_extension
def test_extension_registers_the_ops():
    merge = torch.ops.prefix_grouper.merge_attention_partials.default
    total = torch.ops.prefix_grouper.sum_row_partials.default
    assert str(merge._schema) == (
        "prefix_grouper::merge_attention_partials(Tensor[] outs, Tensor[] lses, int[] row_starts, int total_rows, "
        "Tensor? sinks, ScalarType out_dtype) -> (Tensor out, Tensor lse)")
    assert str(total._schema) == ("prefix_grouper::sum_row_partials(Tensor[] parts, int[] row_starts, "
                                  "int total_rows, ScalarType dtype) -> Tensor")
    # The fakes registered by flash_merge give shapes without running a kernel (torch.compile's view).
    outs = [torch.empty(rows, 2, 5, dtype=torch.bfloat16, device="meta") for rows in (3, 0)]
    lses = [torch.empty(2, rows, device="meta") for rows in (3, 0)]
    out, lse = merge(outs, lses, [1, 0], 6, None, torch.float16)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((6, 2, 5), torch.float16, (6, 2), torch.float32)
    summed = total(outs, [1, 0], 6, torch.float32)
    assert (summed.shape, summed.dtype) == ((6, 2, 5), torch.float32)


def _cuobjdump():
    """A cuobjdump: the toolkit's, else one on PATH, else the one Triton bundles; None if none."""
    toolkit = os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0")
    candidates = [os.path.join(toolkit, "bin", "cuobjdump"), "/usr/local/cuda-13.0/bin/cuobjdump",
                  shutil.which("cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


@needs_extension
def test_extension_holds_sass_for_sm80_and_sm90a():
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the extension with")
    library = prefix_grouper._C.__file__
    listing = subprocess.run([cuobjdump, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in listing and "sm_90a" in listing, listing
    # Both kernels, in each architecture's SASS (not only the architectures of other sources).
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True,
                           check=True).stdout
    kernels_by_arch, arch = {}, None
    for line in usage.splitlines():
        if line.strip().startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.strip().startswith("Function "):
            kernels_by_arch.setdefault(arch, set()).add(line.strip())
    for arch in ("sm_80", "sm_90a"):
        kernels = " ".join(kernels_by_arch.get(arch, ()))
        assert "merge_attention_partials_kernel" in kernels and "sum_row_partials_kernel" in kernels, arch


@needs_gpu
@pytest.mark.parametrize("num_parts", [5, 9, 19])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads, dim", [(1, 1), (3, 97), (4, 128), (2, 256), (2, 300)])
def test_cuda_merge_matches_fallback(generator, heads, dim, dtype, out_dtype, num_parts):
    parts = random_parts(generator, MANY_SPANS[:num_parts], heads, dim, dtype, strided=True, device="cuda")
    for sinks in (None, torch.randn(heads, generator=generator).cuda().half()):
        out, lse = merge_partials(parts, TOTAL_ROWS, sinks=sinks, out_dtype=out_dtype, implementation="cuda")
        expected_out, expected_lse = merge_partials(parts, TOTAL_ROWS, sinks=sinks, out_dtype=out_dtype,
                                                    implementation="torch")
        # Both compute in float32 from the same inputs and differ only by expf/logf (a few float32
        # ulps) and the order of the additions, ~1e-6 relative; rounding that to out_dtype can
        # still move a value by one ulp of out_dtype, hence rtol = that ulp (atol for values near 0).
        torch.testing.assert_close(out, expected_out, rtol=max(eps(out_dtype or dtype), 1e-5), atol=1e-5)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)
        assert (out[UNCOVERED_ROWS] == 0).all() and torch.isfinite(out).all()


@needs_gpu
@pytest.mark.parametrize("num_parts", [5, 9, 19])
@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float64, None), (torch.float64, torch.float32)])
def test_cuda_sum_matches_fallback_exactly(generator, dtype, out_dtype, num_parts):
    # The CUDA op adds in the fallback's order in the same precision (float32, float64 for
    # float64), then rounds once to the output dtype: the results are identical.
    parts = [(start, torch.randn(rows, 3, 100, generator=generator).to("cuda", dtype)[..., :97])
             for start, rows in MANY_SPANS[:num_parts]]
    total = sum_partials(parts, TOTAL_ROWS, dtype=out_dtype, implementation="cuda")
    expected = sum_partials(parts, TOTAL_ROWS, dtype=out_dtype, implementation="torch")
    assert torch.equal(total, expected)


@needs_gpu
def test_cuda_ops_check_their_arguments():
    merge = torch.ops.prefix_grouper.merge_attention_partials
    out, lse = torch.zeros(4, 2, 3, device="cuda"), torch.zeros(2, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"lses\[0\] must be \[H, R\]"):
        merge([out], [lse.t()], [0], 4, None, torch.float32)
    with pytest.raises(RuntimeError, match=r"row_starts\[0\] = 1"):
        merge([out], [lse], [1], 4, None, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        merge([out], [lse], [0], 4, None, torch.float64)
    with pytest.raises(RuntimeError, match=r"outs\[1\] must be \[R, H, D\]"):
        merge([out, out[:, :1]], [lse, lse[:1]], [0, 0], 4, None, torch.float32)
    with pytest.raises(RuntimeError, match="sinks must be"):
        merge([out], [lse], [0], 4, torch.zeros(3, device="cuda"), torch.float32)
    with pytest.raises(RuntimeError, match=r"parts\[0\] must have a contiguous last dim"):
        torch.ops.prefix_grouper.sum_row_partials([out.transpose(1, 2)], [0], 4, torch.float32)
    empty_out, empty_lse = merge([out[:0]], [lse[:, :0]], [0], 0, None, torch.bfloat16)
    assert empty_out.shape == (0, 2, 3) and empty_lse.shape == (0, 2)
