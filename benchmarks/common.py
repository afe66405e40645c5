"""Shared benchmark plumbing: timing, FLOP counts, output folders, equivalence verdicts, plots."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")  # committed figures, refreshed on request
RUNS_DIR = os.path.join(REPO_ROOT, "runs")  # ignored by git: ordinary runs never dirty the work tree


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def measure_ms(fn, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronized; do_bench on GPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def shared_prefix_flops(layout, heads: int, head_dim: int) -> float:
    """Useful forward FLOPs: ``4 d [P^2/2 + sum_i (S_i P + S_i^2/2)]`` per head and group."""
    total = 0.0
    for p, suffixes in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        total += p * p / 2 + sum(s * p + s * s / 2 for s in suffixes)
    return 4 * head_dim * heads * total


def add_device_arguments(parser) -> None:
    """``--device`` (default: the GPU when there is one) and ``--threads`` (CPU threads for torch)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (1 gives steady timings on a shared or small VM)")


def device_of(args) -> torch.device:
    """The device chosen by :func:`add_device_arguments`'s options, after applying ``--threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def add_output_arguments(parser, run_name: str) -> None:
    """``--out`` (default ``runs/<run_name>/``) or ``--update-results`` (the committed folder)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=os.path.join(RUNS_DIR, run_name),
                       help=f"folder for the CSV and PNG files (default: runs/{run_name}/, ignored by git)")
    where.add_argument("--update-results", action="store_true",
                       help="write to benchmarks/results/ instead, refreshing the committed figures")


def output_dir(args) -> str:
    """The folder chosen by :func:`add_output_arguments`'s options."""
    return RESULTS_DIR if args.update_results else args.out


def report_equivalence(what: str, max_err: float, tolerance: float, precision: str) -> None:
    """Say in words whether the packed and unpacked layouts agree; exit with status 1 if not."""
    verdict = "PASS" if max_err <= tolerance else "FAIL"  # a NaN error fails
    line = (f"equivalence ({what}): {verdict}, max |packed - unpacked| = {max_err:.1e} "
            f"{'<=' if verdict == 'PASS' else '>'} {tolerance:.0e} ({precision})")
    if verdict == "FAIL":
        raise SystemExit(line)
    print(line, flush=True)


def write_csv(rows: list[dict], path: str) -> None:
    """Rows of one dict each (same keys) to ``path``, creating its folder."""
    import csv

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def matplotlib_pyplot():
    """pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    matplotlib_pyplot().close(fig)


def bar_chart(series: dict[str, dict[str, float]], path: str, *, ylabel: str, title: str,
              log_scale: bool = False) -> None:
    """Grouped bars, ``series[label][category] = value``; a category a series lacks is a gap."""
    plt = matplotlib_pyplot()
    categories = list(dict.fromkeys(c for values in series.values() for c in values))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([c + offset for c, name in enumerate(categories) if name in values],
               [values[name] for name in categories if name in values], width, label=label)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)
