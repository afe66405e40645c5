"""Registers, spills, shared memory and compile time of the attention kernels' launch
configurations on Hopper (sm_90a), measured on any machine: no GPU is needed.

Each kernel (forward, dQ, dK/dV) is compiled with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` at every requested head dim, tile, inner block and warp count;
the bundled ``ptxas -v`` then reports registers per thread and spill-store bytes. These are
what the default autotuning space is pruned by (see ``triton_autotune``); they say nothing of
speed, which only a GPU run measures.

    python scripts/sm90_kernel_report.py --out benchmarks/results/sm90_ptxas_cpu_2026-12-04/kernels_triton3.6.csv

Run it without TRITON_INTERPRET (the kernels must be real JIT functions).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

FP32_POINTERS = {"lse_ptr", "delta_ptr", "dlse_ptr", "dk_partial_ptr", "dv_partial_ptr", "sinks_ptr"}
FP32_SCALARS = {"softmax_scale", "score_scale", "softcap_log2"}


def kernel_signature(kernel, constants: dict, dtype: str = "bf16") -> dict[str, str]:
    """``triton.compile`` argument types of an attention kernel, from the kernels' naming
    convention: tensors of the input dtype, fp32 statistics, int32 tile schedules and runs
    table, int32 sizes and strides, fp32 scales."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name.endswith(("tiles_ptr", "runs_ptr")):
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = f"*{dtype}"
        else:
            types[name] = "fp32" if name in FP32_SCALARS else "i32"
    return types


def jit_function(kernel):
    """The ``JITFunction`` under any autotuner or heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_sm90(kernel, constants: dict, num_warps: int, num_stages: int, dtype: str = "bf16"):
    """``kernel`` compiled for sm_90 (``dtype`` tensors) with ``constants`` as constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = jit_function(kernel)
    constants = {k: v for k, v in constants.items() if k in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=kernel_signature(kernel, constants, dtype), constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(ptx: str) -> tuple[int, int]:
    """``(registers per thread, spill-store bytes)`` from triton's bundled ptxas."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        result = subprocess.run([ptxas, "-arch=sm_90a", "-v", handle.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def kernel_constants(name: str, head_dim: int, tile: int, inner: int, precision: str = "tf32") -> dict:
    """The constexprs of one kernel's plain (no window, softcap or sinks) MHA launch."""
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, CHECK_DIMS=False, DOT_PRECISION=precision,
                  HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_SINKS=False)
    if name == "dkdv":  # key tile BLOCK_N, inner query block BLOCK_M
        return dict(common, BLOCK_N=tile, BLOCK_M=inner)
    return dict(common, BLOCK_M=tile, TILE_TOKENS=tile, HEADS_PER_PROGRAM=1, BLOCK_N=inner)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def plot_report(rows: list[dict], path: str) -> None:
    """Spill-store bytes per config: one panel per kernel, bars per (warps, stages); ``rows``
    as written to the CSV (or read back from it)."""
    from prefix_grouper.trainers.metrics import pyplot_or_none

    plt = pyplot_or_none(f"the plot {path}")
    if plt is None:
        return
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    variants = list(dict.fromkeys((r["num_warps"], r["num_stages"]) for r in rows))
    fig, axes = plt.subplots(len(kernels), 1, figsize=(12, 3.2 * len(kernels)), squeeze=False)
    width = 0.8 / len(variants)
    for ax, kernel in zip(axes[:, 0], kernels):
        mine = [r for r in rows if r["kernel"] == kernel]
        shapes = list(dict.fromkeys((r["head_dim"], r["tile"], r["inner_block"]) for r in mine))
        for i, (warps, stages) in enumerate(variants):
            spills = {(r["head_dim"], r["tile"], r["inner_block"]): int(r["spill_store_bytes"]) for r in mine
                      if (r["num_warps"], r["num_stages"]) == (warps, stages)}
            offset = (i - (len(variants) - 1) / 2) * width
            ax.bar([x + offset for x, shape in enumerate(shapes) if shape in spills],
                   [spills[shape] for shape in shapes if shape in spills], width,
                   label=f"{warps} warps, {stages} stages")
        ax.set_xticks(range(len(shapes)), [f"D{d}\n{t}x{i}" for d, t, i in shapes], fontsize=7)
        ax.set_ylabel("spill-store bytes")
        ax.set_title(f"{kernel}: head dim, tile x inner block (sm_90a, ptxas)", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=parse_ints, default=[64, 128, 256])
    parser.add_argument("--tiles", type=parse_ints, default=[64, 128])
    parser.add_argument("--inner", type=parse_ints, default=[32, 64, 128])
    parser.add_argument("--warps", type=parse_ints, default=[4, 8])
    parser.add_argument("--stages", type=parse_ints, default=[2, 3])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp32-ieee"], default="bf16",
                        help="tensor dtype; fp32 dots use TF32 unless fp32-ieee (torch's default precision)")
    parser.add_argument("--out", required=True, help="CSV to write")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles real kernels")

    # A fresh cache, so compile_s times compiling rather than a cache hit.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90_report_")
    import triton
    from tqdm import tqdm

    from prefix_grouper.attention.triton_bwd import prefix_attention_dkdv_kernel, prefix_attention_dq_kernel
    from prefix_grouper.attention.triton_fwd import prefix_attention_fwd_kernel

    kernels = {"fwd": prefix_attention_fwd_kernel, "dq": prefix_attention_dq_kernel,
               "dkdv": prefix_attention_dkdv_kernel}
    cases = [case for case in itertools.product(kernels, args.head_dims, args.tiles, args.inner, args.warps,
                                                args.stages) if case[3] <= case[2]]
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    dtype, precision = ("fp32", "ieee") if args.dtype == "fp32-ieee" else (args.dtype, "tf32")
    fields = ["kernel", "dtype", "dot_precision", "head_dim", "tile", "inner_block", "num_warps", "num_stages",
              "registers", "spill_store_bytes", "shared_bytes", "compile_s", "target", "triton", "cpu", "commit", "utc"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = []
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for name, head_dim, tile, inner, warps, stages in tqdm(cases, desc="compiling for sm_90a", unit="config"):
            start = time.perf_counter()
            compiled = compile_sm90(kernels[name], kernel_constants(name, head_dim, tile, inner, precision), warps,
                                    stages, dtype)
            compile_s = time.perf_counter() - start
            registers, spills = ptxas_report(compiled.asm["ptx"])
            rows.append(dict(kernel=name, dtype=dtype, dot_precision=precision, head_dim=head_dim, tile=tile,
                             inner_block=inner, num_warps=warps, num_stages=stages, registers=registers,
                             spill_store_bytes=spills,
                             shared_bytes=compiled.metadata.shared, compile_s=f"{compile_s:.2f}",
                             target="sm_90a", triton=triton.__version__, cpu=cpu_name(), commit=commit, utc=stamp))
            writer.writerow(rows[-1])
            handle.flush()
    plot_report(rows, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and its .png ({len(cases)} configs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
