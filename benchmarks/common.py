"""Shared benchmark plumbing: sizes, timing, memory, FLOP counts, output folders, provenance,
equivalence verdicts, CSV/PNG output and ratio summaries."""
from __future__ import annotations

import ctypes
import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")  # committed figures, refreshed on request
RUNS_DIR = os.path.join(REPO_ROOT, "runs")  # ignored by git: ordinary runs never dirty the work tree

# Qwen2Config sizes of the models the GPU suites build with random weights (nothing is downloaded).
QWEN2_5_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
QWEN2_5_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


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


def measure_ms(fn, device: torch.device, warmup: int = 2, repeats: int = 5, *, whole_steps: bool = False) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``.

    On GPU, kernels are timed by do_bench (its own warm-up and repeat counts, 100 ms of
    calls); ``whole_steps=True`` times calls of 100 ms or more (a model's training step),
    where do_bench would take the median of a single call, by the synchronized wall clock.
    """
    if device.type == "cuda" and not whole_steps:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device: torch.device) -> float:
    """Memory ``fn()`` allocates at its peak beyond what was allocated before it:
    torch.cuda.max_memory_allocated on GPU; on CPU the process's peak resident size (VmHWM)
    above its resident size before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20

    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    # Hand freed heap pages back first: glibc keeps them resident, so a step reusing them
    # would not raise the peak. Then reset VmHWM to the current resident size.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - base) / 2**10


def add_size_arguments(parser) -> None:
    """``--quick`` (the device's smallest shapes, fewer repeats) and ``--smoke`` (tiny shapes,
    one timed call: exercises the code path, measures nothing worth quoting)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="this device's smallest shapes, fewer repeats")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes and one timed call: checks the code path, measures nothing worth quoting")


def suite_setup(args, *, gpu: list, cpu: list, smoke: list) -> tuple[torch.device, torch.dtype, list]:
    """``(device, dtype, configs)`` of a suite's options: the device of :func:`device_of`;
    bfloat16 on GPU, float32 on CPU (where bf16 matmuls are not representative); the configs
    :func:`add_size_arguments`' options select: ``smoke`` with --smoke, the device's first
    (smallest) with --quick, else all of the device's."""
    device = device_of(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        return device, dtype, smoke
    configs = gpu if device.type == "cuda" else cpu
    return device, dtype, configs[:1] if args.quick else configs


def repeats_of(args) -> tuple[int, int]:
    """``(warm-up calls, timed calls)`` for :func:`measure_ms` under :func:`add_size_arguments`' options."""
    return (0, 1) if args.smoke else (1, 3) if args.quick else (2, 5)


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


@functools.cache
def git_commit() -> str:
    """The commit checked out when this process first asked (the code it imported), ``-dirty``
    when tracked files differed from it, or ``unknown`` outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def provenance(device: torch.device) -> dict:
    """The columns every benchmark row starts with: where, with what and when it was measured."""
    return {"device": device_name(device), "versions": versions(), "git_commit": git_commit(),
            "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def table_lines(rows: list[dict], columns: list[tuple]) -> list[str]:
    """A fixed-width text table: ``columns`` are ``(header, width, cell)``, ``cell`` a row's key
    or a function of the row; a negative width aligns left."""
    def fit(text, width):
        return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"

    lines = ["".join(fit(header, width) for header, width, _ in columns)]
    for row in rows:
        lines.append("".join(fit(cell(row) if callable(cell) else row[cell], width) for _, width, cell in columns))
    return lines


def ratio_lines(rows: list[dict], *, config: str, approach: str, metric: str, baselines: tuple[str, ...]) -> list[str]:
    """``"<config>: <approach> 2.31x vs <baseline>"`` for every approach and baseline measured on
    the same config (``baseline time / approach time``: above 1 is faster than the baseline)."""
    lines = []
    for name in dict.fromkeys(r[config] for r in rows):
        times = {r[approach]: float(r[metric]) for r in rows if r[config] == name}
        for baseline in baselines:
            if not math.isfinite(times.get(baseline, math.nan)):
                continue
            for other, ms in times.items():
                if other != baseline and math.isfinite(ms):
                    lines.append(f"{name}: {other} {times[baseline] / ms:.2f}x vs {baseline} ({metric})")
    return lines


def run_suite(suite: str, module, args) -> list[dict]:
    """Run one suite module (``build_parser``'s ``args``) and write its results into the folder
    of :func:`add_output_arguments`' options: ``<suite>_<device>.csv``, every row stamped with
    :func:`provenance`; ``module.plot(rows, png_path, device name)``'s PNG; and the lines of
    ``module.summary(rows)``, printed. Returns the rows as ``module.run`` made them.

    The CSV is rewritten after every row ``module.run`` yields, so a suite stopped by a
    timeout (scripts/gpu_check.sh) keeps the rows it measured."""
    device = device_of(args)
    stem = os.path.join(output_dir(args), f"{suite}_{slug(device_name(device))}")
    rows, stamped = [], []
    for row in module.run(args):
        rows.append(row)
        stamped.append({"suite": suite, **provenance(device), **row})
        write_csv(stamped, stem + ".csv")
    stamp = stamped[-1]
    module.plot(rows, stem + ".png", stamp["device"])
    print(f"\n{suite}: {stamp['device']}; {stamp['versions']}; commit {stamp['git_commit']}")
    for line in module.summary(rows):
        print(f"  {line}")
    print(f"wrote {stem}.csv and {stem}.png", flush=True)
    return rows


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
