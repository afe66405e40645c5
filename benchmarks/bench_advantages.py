"""GRPO advantage throughput of every available backend, against the device's copy bandwidth.

For N rows (float32 rewards, int64 group ids, groups of G rows) the ideal kernel reads the
rewards and ids once and writes the advantages once: 16 N bytes. GB/s = 16 N / time; the
reference is a torch copy moving the same 16 N bytes (8 N read, 8 N written).

Two scopes are timed: "end_to_end" is the public call ``grpo_advantages`` (id compaction,
plus a sort when the ids are shuffled, then the kernel); "kernel" is the normalization
alone on ids compacted beforehand. Ids come "contiguous" (a prompt's completions adjacent,
as verl and TRL lay them out) or "shuffled".

Writes benchmarks/results/advantages_<device>.csv and .png. Triton on CPU runs under the
interpreter, which says nothing about speed: it is skipped there unless --backends names it.

    python -m benchmarks.bench_advantages --quick --max-rows 1e5 --threads 1  # CPU, < 2 minutes
    python -m benchmarks.bench_advantages                           # GPU: 1e3 .. 1e7 rows
"""
from __future__ import annotations

import argparse
import os

import torch
from tqdm import tqdm

from prefix_grouper.advantages import available_backends, grpo_advantages
from prefix_grouper.advantages.dispatch import normalize_in_groups
from prefix_grouper.advantages.options import NormalizeOptions
from prefix_grouper.advantages.segments import Segments

from .common import RESULTS_DIR, device_name, matplotlib_pyplot, measure_ms, save_figure, slug, versions, write_csv

# grpo_advantages' defaults, so that both scopes time the same normalization.
KERNEL_OPTIONS = NormalizeOptions(scale="group", eps=1e-6, unbiased=True, singleton_raw=True)
BYTES_PER_ROW = 4 + 8 + 4  # float32 reward read, int64 id read, float32 advantage written


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-rows", type=float, default=1e3)
    parser.add_argument("--max-rows", type=float, default=1e7)
    parser.add_argument("--group-sizes", default="4,16,64", help="comma-separated rows per group")
    parser.add_argument("--backends", default=None,
                        help="comma-separated; default: every available one (no Triton on CPU)")
    parser.add_argument("--quick", action="store_true", help="group sizes 4 and 64 only, fewer repeats")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 gives steady timings on a shared or small VM)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    return parser.parse_args()


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


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in available_backends(device) if not (b == "triton" and device.type == "cpu")]
    group_sizes = [4, 64] if args.quick else [int(g) for g in args.group_sizes.split(",")]
    repeats = 5 if args.quick else 9
    rows_list = row_counts(args.min_rows, args.max_rows)
    name = device_name(device)
    header = f"{name}; {versions()}"

    def timed(fn):
        return measure_ms(fn, device, warmup=1, repeats=repeats)

    configs = [(rows, g, order, backend) for rows in rows_list for g in group_sizes
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
            results.append(dict(device=name, versions=versions(), backend=backend, scope=scope, ids=order,
                                rows=rows, group_size=group_size, ms=round(ms, 5), gbps=round(gbps, 3),
                                copy_gbps=round(copy_gbps[rows], 3),
                                fraction_of_copy=round(gbps / copy_gbps[rows], 4)))

    stem = os.path.join(args.out_dir, f"advantages_{slug(name)}")
    write_csv(results, stem + ".csv")
    plot(results, copy_gbps, header, stem + ".png")

    print(f"\n{header}")
    print(f"{'backend':8} {'scope':10} {'ids':10} {'rows':>9} {'G':>3} {'ms':>9} {'GB/s':>8} "
          f"{'copy GB/s':>9} {'of copy':>7}")
    for r in results:
        print(f"{r['backend']:8} {r['scope']:10} {r['ids']:10} {r['rows']:9d} {r['group_size']:3d} {r['ms']:9.4f} "
              f"{r['gbps']:8.2f} {r['copy_gbps']:9.2f} {r['fraction_of_copy']:7.1%}")
    print(f"wrote {stem}.csv and {stem}.png")


def plot(results, copy_gbps, title, path):
    plt = matplotlib_pyplot()

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
    fig.suptitle(f"GRPO advantages: {title}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
