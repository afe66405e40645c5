"""GRPO advantage throughput of every available backend, against the device's copy bandwidth.

For N rows (float32 rewards, int64 group ids, groups of G rows) the ideal kernel reads the
rewards and ids once and writes the advantages once: 16 N bytes. GB/s = 16 N / time; the
reference is a torch copy moving the same 16 N bytes (8 N read, 8 N written).

Two scopes are timed: "end_to_end" is the public call ``grpo_advantages`` (id compaction,
plus a sort when the ids are shuffled, then the kernel); "kernel" is the normalization
alone on ids compacted beforehand. Ids come "contiguous" (a prompt's completions adjacent,
as verl and TRL lay them out) or "shuffled".

Writes advantages_<device>.csv and .png under runs/bench_advantages/ (or --out /
--update-results); ``python -m benchmarks.run --suite advantages`` runs the same. Triton on
CPU runs under the interpreter, which says nothing about speed: it is skipped there unless
--backends names it.

    python -m benchmarks.bench_advantages --quick --threads 1    # CPU: up to 1e5 rows, < 2 minutes
    python -m benchmarks.bench_advantages                        # GPU: 1e3 .. 1e7 rows
"""
from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from prefix_grouper.advantages import available_backends, grpo_advantages
from prefix_grouper.advantages.dispatch import normalize_in_groups
from prefix_grouper.advantages.options import NormalizeOptions
from prefix_grouper.advantages.grouping import Segments

from .common import (add_device_arguments, add_output_arguments, add_size_arguments, device_of, matplotlib_pyplot,
                     measure_ms, repeats_of, run_suite, save_figure, spread, table_lines)

# grpo_advantages' defaults, so that both scopes time the same normalization.
KERNEL_OPTIONS = NormalizeOptions(scale="group", eps=1e-6, unbiased=True, singleton_raw=True)
BYTES_PER_ROW = 4 + 8 + 4  # float32 reward read, int64 id read, float32 advantage written
QUICK_CPU_MAX_ROWS = 1e5


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--min-rows", type=float, default=1e3)
    parser.add_argument("--max-rows", type=float, default=None,
                        help=f"default 1e7 (--quick on CPU: {QUICK_CPU_MAX_ROWS:.0e}; --smoke: --min-rows)")
    parser.add_argument("--group-sizes", default="4,16,64",
                        help="comma-separated rows per group (--quick: 4,64; --smoke: 4)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated; default: every available one (no Triton on CPU)")
    add_output_arguments(parser, "bench_advantages")
    return parser


def row_counts(low: float, high: float) -> list[int]:
    counts, n = [], int(low)
    while n <= high:
        counts.append(n)
        n *= 10
    return counts


def make_batch(rows: int, group_size: int, ids_order: str, device: torch.device):
    gen = torch.Generator().manual_seed(rows + group_size)
    rewards = torch.randn(rows, generator=gen).to(device)
    ids = torch.arange(rows, device=device) // group_size * 7919  # sparse, non-consecutive ids
    if ids_order == "shuffled":
        ids = ids[torch.randperm(rows, generator=gen).to(device)]
    return rewards, ids


def run(args) -> list[dict]:
    """One row per (rows, group size, ids order, backend, scope) for :func:`build_parser`'s options."""
    device = device_of(args)
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in available_backends(device) if not (b == "triton" and device.type == "cpu")]
    group_sizes = [4] if args.smoke else [4, 64] if args.quick else [int(g) for g in args.group_sizes.split(",")]
    max_rows = args.max_rows or (args.min_rows if args.smoke else
                                 QUICK_CPU_MAX_ROWS if args.quick and device.type == "cpu" else 1e7)
    warmup, repeats = repeats_of(args)

    def timed(fn):
        return measure_ms(fn, device, warmup, repeats)

    configs = [(rows, g, order, backend) for rows in row_counts(args.min_rows, max_rows) for g in group_sizes
               for order in ("contiguous", "shuffled") for backend in backends if g <= rows]
    copy_gbps = {}
    results = []
    for rows, group_size, order, backend in tqdm(configs, desc="advantages", unit="config"):
        ideal_bytes = BYTES_PER_ROW * rows
        if rows not in copy_gbps:
            src = torch.randn(ideal_bytes // 8, device=device)  # 8 N bytes read + 8 N written
            dst = torch.empty_like(src)
            copy_gbps[rows] = ideal_bytes / timed(lambda: dst.copy_(src)) / 1e6
        rewards, ids = make_batch(rows, group_size, order, device)
        segments = Segments(ids)
        scopes = {
            "end_to_end": lambda: grpo_advantages(rewards, ids, backend=backend),
            "kernel": lambda: normalize_in_groups(rewards, segments, KERNEL_OPTIONS, backend),
        }
        for scope, fn in scopes.items():
            ms = timed(fn)
            gbps = ideal_bytes / ms / 1e6
            results.append(dict(backend=backend, scope=scope, ids=order, rows=rows, group_size=group_size,
                                ms=round(ms, 5), **spread("ms", ms, 5), gbps=round(gbps, 3), copy_gbps=round(copy_gbps[rows], 3),
                                fraction_of_copy=round(gbps / copy_gbps[rows], 4)))
    return results


def ratios(results) -> list[dict]:
    return []  # compared with the device's copy bandwidth (fraction_of_copy), not with another approach


def summary(results) -> list[str]:
    return table_lines(results, [
        ("backend", -9, "backend"), ("scope", -11, "scope"), ("ids", -10, "ids"), ("rows", 10, "rows"),
        ("G", 4, "group_size"), ("ms", 10, lambda r: f"{r['ms']:.4f}"), ("GB/s", 9, lambda r: f"{r['gbps']:.2f}"),
        ("copy GB/s", 10, lambda r: f"{r['copy_gbps']:.2f}"), ("of copy", 8, lambda r: f"{r['fraction_of_copy']:.1%}")])


def main():
    run_suite("advantages", sys.modules[__name__], build_parser().parse_args())


def plot(results, path, where):
    plt = matplotlib_pyplot()
    copy_gbps = {r["rows"]: r["copy_gbps"] for r in results}

    scopes = sorted({r["scope"] for r in results})
    fig, axes = plt.subplots(1, len(scopes), figsize=(6.5 * len(scopes), 4.8), sharey=True, squeeze=False)
    for ax, scope in zip(axes[0], scopes):
        rows = sorted(copy_gbps)
        ax.plot(rows, [copy_gbps[n] for n in rows], "k-", lw=2, label="torch copy, same bytes")
        lines = sorted({(r["backend"], r["group_size"], r["ids"]) for r in results if r["scope"] == scope})
        for backend, group_size, order in lines:
            points = [r for r in results if (r["scope"], r["backend"], r["group_size"], r["ids"]) ==
                      (scope, backend, group_size, order)]
            ax.plot([p["rows"] for p in points], [p["gbps"] for p in points],
                    "-" if order == "contiguous" else "--", marker="o",
                    label=f"{backend}, G={group_size}, {order} ids")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows N")
        ax.set_title(scope.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (16 N bytes / time)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"GRPO advantages: {where}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
