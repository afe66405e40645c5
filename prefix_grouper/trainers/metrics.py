"""Per-step metrics: DIR/metrics.jsonl (one JSON object per step) and DIR/rewards.png (with matplotlib)."""
from __future__ import annotations

import json
import os

__all__ = ["append_metrics", "plot_rewards", "pyplot_or_none", "read_metrics", "summary_table"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "rewards.png"


def append_metrics(out_dir: str, record: dict) -> None:
    with open(os.path.join(out_dir, METRICS_FILE), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, METRICS_FILE), encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary_table(out_dirs: list[str], window: int = 20) -> str:
    """Markdown table of runs: mean reward of the first and last ``window`` steps, packed and
    unpacked tokens per step, seconds per step."""
    lines = [f"| run | steps | reward first {window} | reward last {window} | success last {window} "
             f"| tokens/step packed | tokens/step unpacked | s/step |", "|---|---|---|---|---|---|---|---|"]
    for out_dir in out_dirs:
        records = read_metrics(out_dir)
        first, last = records[:window], records[-window:]
        success = (f"{_mean([r['success_rate'] for r in last]):.2f}" if "success_rate" in records[0] else "-")
        lines.append(f"| {os.path.basename(os.path.normpath(out_dir))} | {len(records)} "
                     f"| {_mean([r['reward_mean'] for r in first]):.3f} | {_mean([r['reward_mean'] for r in last]):.3f} "
                     f"| {success} | {_mean([r['tokens_packed'] for r in records]):.0f} "
                     f"| {_mean([r['tokens_unpacked'] for r in records]):.0f} "
                     f"| {_mean([r['seconds'] for r in records]):.2f} |")
    return "\n".join(lines)


def pyplot_or_none(skipped: str):
    """matplotlib's pyplot on the file-only Agg backend, or None (and one printed line naming
    what is ``skipped`` and how to get it) where matplotlib is not installed: it is an extra,
    and nothing measured or trained is ever lost to a missing plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {skipped} (pip install matplotlib, or the bench extra: "
              f"pip install 'prefix-grouper-kernels[bench]')", flush=True)
        return None
    return plt


def plot_rewards(out_dir: str, title: str) -> str | None:
    """Plot ``reward_mean``, every ``reward/<channel>`` and ``success_rate`` per step (raw and a
    20-step moving average) into ``out_dir/rewards.png``; returns its path, or None when
    matplotlib is not installed (see :func:`pyplot_or_none`)."""
    path = os.path.join(out_dir, PLOT_FILE)
    plt = pyplot_or_none(path)
    if plt is None:
        return None
    records = read_metrics(out_dir)
    keys = [k for k in records[0] if k == "reward_mean" or k.startswith("reward/") or k == "success_rate"]
    steps = [r["step"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        values = [r[key] for r in records]
        smooth = [_mean(values[max(0, i - 19):i + 1]) for i in range(len(values))]
        line, = axis.plot(steps, smooth, label=key)
        axis.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("reward (20-step moving average)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

