"""Shared benchmark plumbing: timing, FLOP counts, naive-layout indices, result files."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def naive_row_index(layout):
    """``[N, L]`` packed indices of every ``[prefix; completion]`` row, right-padded (clamped),
    and the row lengths ``[N]``: the naive layout as a gather from the packed one."""
    lengths = layout.prefix_lens[layout.completion_group] + layout.suffix_lens
    width = max(layout.prefix_lens_list[b] + s for b, s in
                zip(layout.completion_group.tolist(), layout.suffix_lens_list))
    cols = torch.arange(width, device=layout.device)[None, :]
    prefix_len = layout.prefix_lens[layout.completion_group][:, None]
    index = torch.where(cols < prefix_len,
                        layout.prefix_starts[layout.completion_group][:, None] + cols,
                        layout.suffix_starts[:, None] + cols - prefix_len)
    return index.clamp(max=layout.total_tokens - 1), lengths


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
