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

# The arguments live in a module of their own, without torch; the suites import the add_*
# functions from here.
from .arguments import (DEFAULT_CPU_THREADS, REPO_ROOT, add_device_arguments, add_output_arguments,  # noqa: F401
                        add_size_arguments, output_dir)

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


class Timing(float):
    """A measured time: its value is the median over the repeats (what tables and plots
    show), with ``low`` and ``high``, the fastest and slowest repeat, beside it. A float, so
    arithmetic and formatting treat it as the median."""

    low: float
    high: float

    def __new__(cls, times: list[float]) -> "Timing":
        timing = super().__new__(cls, statistics.median(times))
        timing.low, timing.high = min(times), max(times)
        return timing


def spread(metric: str, timing: float, digits: int = 3) -> dict:
    """``{metric}_min`` and ``{metric}_max`` columns of a :class:`Timing` (NaN for an
    unmeasured time, a plain NaN float): the range a ratio's significance is judged on."""
    low, high = getattr(timing, "low", math.nan), getattr(timing, "high", math.nan)
    return {f"{metric}_min": f"{low:.{digits}f}", f"{metric}_max": f"{high:.{digits}f}"}


def measure_ms(fn, device: torch.device, warmup: int = 2, repeats: int = 5, *, whole_steps: bool = False) -> Timing:
    """Wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup``: the
    median, with the min and max beside it (:class:`Timing`).

    On GPU, kernels are timed by do_bench (its own warm-up and repeat counts, 100 ms of
    calls); ``whole_steps=True`` times calls of 100 ms or more (a model's training step),
    where do_bench would take the median of a single call, by the synchronized wall clock.
    """
    if device.type == "cuda" and not whole_steps:
        import triton.testing

        return Timing([float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")])

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
    return Timing(times)


def measure_interleaved_ms(fns: dict, repeats: tuple[int, int]) -> tuple[dict, dict]:
    """``({name: warm-up s}, {name: Timing ms})`` of CPU calls ``fns`` timed in turns: every
    round calls each once, so that load elsewhere on a shared machine hits all of them alike
    (``repeats``: :func:`repeats_of`'s warm-up calls and rounds)."""
    warmups = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        for _ in range(max(1, repeats[0])):
            fn()
        warmups[name] = time.perf_counter() - start
    times: dict = {name: [] for name in fns}
    for _ in range(repeats[1]):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return warmups, {name: Timing(values) for name, values in times.items()}


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


def flash_refusal(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float | None = None) -> str | None:
    """Why ``prefix_attention(backend="flash")`` cannot run a call on ``device`` in ``dtype`` with
    this head dim and softcap (its own message), or None where it runs.

    Asked of a tiny call, because flash refuses per call, not per device: off CUDA (outside the
    test engine), in float32, with a softcap on PyTorch's FlashAttention-2 engine, and at head
    dims that are not a multiple of 8. A row then records the refusal a user would read."""
    from prefix_grouper import GroupLayout, prefix_attention

    layout = GroupLayout.from_lengths([2], [[1]], device=device)
    x = torch.zeros(layout.total_tokens, 1, head_dim, device=device, dtype=dtype)
    try:
        prefix_attention(x, x, x, layout, backend="flash", softcap=softcap)
    except ValueError as refusal:  # BackendUnavailableError is one too
        # The registry's refusal goes on to list every other backend: flash's reason is its head.
        return str(refusal).split(". Available there:")[0]
    return None


def shared_prefix_flops(layout, heads: int, head_dim: int) -> float:
    """Useful forward FLOPs: ``4 d [P^2/2 + sum_i (S_i P + S_i^2/2)]`` per head and group."""
    total = 0.0
    for p, suffixes in zip(layout.prefix_lens_list, layout.suffix_lens_per_group):
        total += p * p / 2 + sum(s * p + s * s / 2 for s in suffixes)
    return 4 * head_dim * heads * total


def device_of(args) -> torch.device:
    """The device chosen by :func:`add_device_arguments`'s options (``auto``: the GPU when
    torch sees one), after pinning torch's CPU threads: ``--threads``, or
    :data:`DEFAULT_CPU_THREADS` for a CPU run."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or DEFAULT_CPU_THREADS)
    return device


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


PROVENANCE_KEYS = ("device", "versions", "git_commit", "timestamp_utc")


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


def ranges_overlap(a: dict, b: dict, metric: str) -> bool:
    """Whether rows ``a`` and ``b`` have overlapping ``[{metric}_min, {metric}_max]`` ranges
    (True, "not significant", where either lacks them)."""
    try:
        a_low, a_high, b_low, b_high = (float(r[f"{metric}_{end}"]) for r in (a, b) for end in ("min", "max"))
    except KeyError:
        return True
    return not (a_high < b_low or b_high < a_low)


def ratios(rows: list[dict], *, config: str, approach: str, metric: str, baselines: tuple[str, ...]) -> list[dict]:
    """One dict per approach and baseline measured on the same config: ``ratio`` = baseline
    time / approach time (above 1 is faster than the baseline) and ``significant``, False
    when the two min-max ranges overlap (the repeats cannot tell them apart)."""
    found = []
    for name in dict.fromkeys(r[config] for r in rows):
        measured = {r[approach]: r for r in rows if r[config] == name and math.isfinite(float(r[metric]))}
        for baseline in baselines:
            if baseline not in measured:
                continue
            for other, row in measured.items():
                if other != baseline:
                    found.append({"config": name, "approach": other, "baseline": baseline, "metric": metric,
                                  "ratio": f"{float(measured[baseline][metric]) / float(row[metric]):.2f}",
                                  "significant": not ranges_overlap(row, measured[baseline], metric)})
    return found


def ratio_text(ratio: dict) -> str:
    """``"<config>: <approach> 2.31x vs <baseline> (<metric>)"``, marked when not significant."""
    text = f"{ratio['config']}: {ratio['approach']} {ratio['ratio']}x vs {ratio['baseline']} ({ratio['metric']})"
    return text if ratio["significant"] else text + " - not significant: the min-max ranges overlap"


def run_suite(suite: str, module, args) -> list[dict]:
    """Run one suite module (``build_parser``'s ``args``) and write its results into the folder
    of :func:`add_output_arguments`' options: ``<suite>_<device>.csv``, every row stamped with
    :func:`provenance`; ``<suite>_<device>_ratios.csv``, ``module.ratios(rows)`` (speed-ups
    and whether each is significant), printed too; ``module.plot(rows, png_path, device
    name)``'s PNG where matplotlib is installed; and the lines of ``module.summary(rows)``.
    ``--smoke`` is a plumbing check: it prints and writes no ratios. Returns the rows.

    The CSV is rewritten after every row ``module.run`` yields, so a suite stopped by a
    timeout (scripts/gpu_check.sh) keeps the rows it measured."""
    from prefix_grouper.trainers.metrics import pyplot_or_none

    device = device_of(args)
    stem = os.path.join(output_dir(args), f"{suite}_{slug(device_name(device))}")
    if device.type == "cpu":
        print(f"{suite}: timing on {torch.get_num_threads()} CPU thread(s) (--threads)", flush=True)
    rows, stamped = [], []
    for row in module.run(args):
        rows.append(row)
        stamped.append({"suite": suite, **provenance(device), **row})
        write_csv(stamped, stem + ".csv")
    stamp = stamped[-1]
    written = [stem + ".csv"]
    print(f"\n{suite}: {stamp['device']}; {stamp['versions']}; commit {stamp['git_commit']}")
    for line in module.summary(rows):
        print(f"  {line}")
    if args.smoke:
        print("  (--smoke: a plumbing check; no ratios)")
    else:
        found = module.ratios(rows)
        for ratio in found:
            print(f"  {ratio_text(ratio)}")
        if found:
            write_csv([{"suite": suite, **{k: stamp[k] for k in PROVENANCE_KEYS}, **r} for r in found],
                      stem + "_ratios.csv")
            written.append(stem + "_ratios.csv")
    # Everything measured is on disk already: a missing plotting library costs the plot only.
    if pyplot_or_none(stem + ".png") is not None:
        module.plot(rows, stem + ".png", stamp["device"])
        written.append(stem + ".png")
    print(f"wrote {' and '.join(written)}", flush=True)
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
