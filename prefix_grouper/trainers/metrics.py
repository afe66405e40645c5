"""Per-step metrics: DIR/metrics.jsonl (one JSON object per step) and DIR/rewards.png."""
from __future__ import annotations

import json
import os

__all__ = ["append_metrics", "plot_rewards", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "rewards.png"


def append_metrics(out_dir: str, record: dict) -> None:
    with open(os.path.join(out_dir, METRICS_FILE), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, METRICS_FILE), encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_rewards(out_dir: str, title: str) -> str:
    """Plot ``reward_mean``, every ``reward/<channel>`` and ``success_rate`` per step (raw and a
    20-step moving average) into ``out_dir/rewards.png``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    keys = [k for k in records[0] if k == "reward_mean" or k.startswith("reward/") or k == "success_rate"]
    steps = [r["step"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        values = [r[key] for r in records]
        window = min(20, len(values))
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        line, = axis.plot(steps, smooth, label=key)
        axis.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("reward (20-step moving average)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    path = os.path.join(out_dir, PLOT_FILE)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
