"""Launch configurations of the attention kernels on a GPU: the autotuning modes
(``$PREFIX_GROUPER_AUTOTUNE``), the candidate space and its register budget, and the fixed
configs of the interpreter and of the "off" mode."""
from __future__ import annotations

import os

import triton

from ..runtime import triton_interpreted

# Inner block of every kernel under the interpreter (no autotuning there): with the
# interpreter's 32-row tiles, diagonals still span several blocks as on the GPU.
INTERPRETER_INNER_BLOCK = 16
# GPU autotuning. A full sweep (every inner block x warps x stages per kernel and key, each
# compiled and benchmarked) made a process's first forward+backward take over a minute, so
# by default ("quick") each kernel tries only 8 warps, its own stages (dK/dV 2 and 3, the
# others 3) and inner blocks of at most inner_tile_elements() / HEAD_DIM_PAD rows: the
# configs that ptxas's sm_90a reports showed spilling least (the figures, and the first GPU
# run's times, are in benchmarks/results/sm90_ptxas_cpu_2026-12-04/README.md and
# benchmarks/results/gpu_h200_2026-12-04/). Tuned choices are cached on disk by triton
# (cache_results), so later processes skip the sweep. "full" restores the whole sweep,
# unpruned, to check on a GPU that nothing faster was pruned; "off" launches one fixed
# config per kernel (8 warps, :func:`fixed_inner_block`, dK/dV 2 stages, the others 3) with
# no benchmarking, for correctness runs, where a sweep costs minutes of compiling.
AUTOTUNE_ENV = "PREFIX_GROUPER_AUTOTUNE"
QUICK_INNER_BLOCKS = (32, 64, 128)
QUICK_WARPS = 8
FULL_SPACE = ((16, 32, 64, 128), (4, 8), (2, 3, 4))
AUTOTUNE_MODES = ("quick", "full", "off")
INNER_TILE_ELEMENTS = 8192


def autotune_mode() -> str:
    """``$PREFIX_GROUPER_AUTOTUNE``: "quick" (default), "full" or "off"."""
    mode = os.environ.get(AUTOTUNE_ENV, "quick")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV} must be one of {list(AUTOTUNE_MODES)}, got {mode!r}")
    return mode


def autotune_space(quick_stages: tuple[int, ...] = (3,)) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(inner block sizes, warps, stages)`` an autotuned kernel is built with (read when it
    is defined, at import): the "full" sweep, or the "quick" candidates with the kernel's
    ``quick_stages``."""
    if autotune_mode() == "full":
        return FULL_SPACE
    return QUICK_INNER_BLOCKS, (QUICK_WARPS,), quick_stages


def inner_tile_elements(precision: str) -> int:
    """The register budget of an inner block, in rows times padded head dim: tensor-core dots
    (bf16, fp16, tf32) keep their operands in shared memory; fp32 "ieee" dots are FMA loops
    over register operands: at head dims 64 and 128, on their fp32 tiles, only 16-row inner
    blocks kept every kernel's spills under 200 bytes (kernels_fp32_ieee_triton3.6.csv in
    benchmarks/results/sm90_ptxas_cpu_2026-12-04/), hence an eighth."""
    return INNER_TILE_ELEMENTS if precision != "ieee" else INNER_TILE_ELEMENTS // 8


def fits_register_budget(inner: int, head_dim_pad: int, precision: str) -> bool:
    """Whether an inner block of ``inner`` rows of width ``head_dim_pad`` stays inside the
    budget that keeps ptxas's spills small (see the autotuning comment above)."""
    return inner * head_dim_pad <= inner_tile_elements(precision)


def fixed_inner_block(head_dim_pad: int, tile: int, precision: str) -> int:
    """The "off" mode's inner block: 64 rows, fewer where the register budget or the tile
    (both powers of two, so the result divides the tile) asks for it, never under 16."""
    return min(64, max(16, inner_tile_elements(precision) // head_dim_pad), tile)


def autotune_inner_block(kernel, inner: str, tile: str, extra_keys: tuple[str, ...] = (),
                         quick_stages: tuple[int, ...] = (3,)):
    """``kernel`` autotuned over its inner block ``inner``, a divisor of the schedule's tile
    (kernel argument ``tile``), per head dim, tile size, dot precision and ``extra_keys``
    arguments (and, as triton always does, per tensor dtype); ``quick_stages``: its pipeline
    depths in the default space."""
    sizes, warps_options, stages_options = autotune_space(quick_stages)
    prune_to_budget = autotune_mode() != "full"

    def kept_configs(configs, named_args, **kwargs):
        size = kwargs.get(tile, named_args.get(tile))
        head_dim_pad = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD"))
        precision = kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION"))
        # An inner block longer than the tile, or not dividing it, only adds masked work.
        dividing = [c for c in configs if c.kwargs[inner] <= size and size % c.kwargs[inner] == 0]
        preferred = [c for c in dividing if c.kwargs[inner] in sizes
                     and (not prune_to_budget or fits_register_budget(c.kwargs[inner], head_dim_pad, precision))]
        if preferred:
            return preferred
        smallest = min(c.kwargs[inner] for c in dividing)
        return [c for c in dividing if c.kwargs[inner] == smallest]

    # A tile shorter than every candidate (not the GPU schedule's, but kept valid) gets the tile itself.
    configs = [triton.Config({inner: size}, num_warps=warps, num_stages=stages)
               for size in sorted({16, *sizes}) for warps in warps_options for stages in stages_options]
    # DOT_PRECISION is a key: fp32 with and without TF32 prune to different blocks.
    keys = ["HEAD_DIM", tile, "DOT_PRECISION", *extra_keys]
    return triton.autotune(configs=configs, key=keys, cache_results=True,
                           prune_configs_by={"early_config_prune": kept_configs})(kernel)


def launchable(kernel, tuned, inner: str, head_dim_pad: int, tile: int, precision: str, fixed_stages: int = 3):
    """``(kernel to launch, its fixed meta-arguments)``: the autotuned kernel on a GPU; the
    plain one with a fixed inner block under the interpreter (nothing to tune there) or,
    when ``$PREFIX_GROUPER_AUTOTUNE`` is "off", with :func:`fixed_inner_block` (``tile``: the
    kernel's tile argument; ``precision``: its dot precision), 8 warps and ``fixed_stages``."""
    if triton_interpreted():
        return kernel, {inner: INTERPRETER_INNER_BLOCK}
    if autotune_mode() == "off":
        return kernel, {inner: fixed_inner_block(head_dim_pad, tile, precision), "num_warps": QUICK_WARPS,
                        "num_stages": fixed_stages}
    return tuned, {}
