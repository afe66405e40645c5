"""Per-step metrics: DIR/metrics.jsonl (one JSON object per step) and DIR/rewards.png (with matplotlib);
runs compared side by side (:func:`run_costs`, :func:`plot_runs`)."""
from __future__ import annotations

import csv
import json
import os

__all__ = ["append_metrics", "plot_rewards", "plot_runs", "pyplot_or_none", "read_metrics", "run_costs",
           "steps_with_same_rollouts", "summary_table", "write_run_costs"]

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


# Per-step values that the rollout alone decides: two runs whose rollouts are the same agree on them exactly.
ROLLOUT_KEYS = ("reward_mean", "success_rate", "invalid_frac", "episode_steps", "tokens_packed", "tokens_unpacked")


def run_costs(out_dir: str, *, grouped: bool, wall_s: float, reference_dir: str | None = None,
              window: int = 20) -> dict:
    """One run's learning and cost figures, from its metrics.jsonl.

    ``grouped``: whether the run computed its log-probs on the prefix tree (or prefix groups)
    or on the unpacked rows (``--no-prefix-grouper``), which decides the tokens its forward
    passes processed (``tokens_forwarded``). ``wall_s``: the process's wall time, measured by
    the caller. ``reference_dir``: another run of the same seed; ``steps_same_rollouts``
    counts the leading steps whose rollouts match it exactly (:data:`ROLLOUT_KEYS`).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    records = read_metrics(out_dir)
    if len(records) < window:
        raise ValueError(f"{out_dir} has {len(records)} steps, fewer than window={window}")
    packed = sum(r["tokens_packed"] for r in records)
    unpacked = sum(r["tokens_unpacked"] for r in records)
    row = {"run": os.path.basename(os.path.normpath(out_dir)), "log_probs": "grouped" if grouped else "unpacked",
           "steps": len(records),
           f"success_first{window}": round(_mean([r["success_rate"] for r in records[:window]]), 4),
           f"success_last{window}": round(_mean([r["success_rate"] for r in records[-window:]]), 4),
           "wall_s": round(wall_s, 1), "step_seconds_sum": round(sum(r["seconds"] for r in records), 1),
           "tokens_packed": packed, "tokens_unpacked": unpacked, "tokens_forwarded": packed if grouped else unpacked}
    if reference_dir is not None:
        row["steps_same_rollouts"] = steps_with_same_rollouts(records, read_metrics(reference_dir))
    return row


def steps_with_same_rollouts(records: list[dict], reference: list[dict]) -> int:
    """How many leading steps of two runs' records agree exactly on :data:`ROLLOUT_KEYS`."""
    same = 0
    for ours, theirs in zip(records, reference):
        if any(ours[key] != theirs[key] for key in ROLLOUT_KEYS):
            break
        same += 1
    return same


def write_run_costs(path: str, rows: list[dict]) -> None:
    """``rows`` (from :func:`run_costs`) as a CSV file, every key of any row a column (first seen first)."""
    if not rows:
        raise ValueError("rows is empty: nothing to write")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_runs(path: str, runs: dict[str, str], title: str,
              keys: tuple[str, ...] = ("success_rate", "reward_mean")) -> str | None:
    """One panel per metric in ``keys``, each run (``label -> out_dir``) a line of its raw
    per-step values, so runs that should agree step for step (one seed, grouped and unpacked)
    are seen to; a dotted line marks the first step whose rollouts differ from the first
    run's. Saved to ``path`` and returned, or None without matplotlib."""
    if not runs:
        raise ValueError("runs is empty: nothing to plot")
    plt = pyplot_or_none(path)
    if plt is None:
        return None
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), sharex=True, squeeze=False)
    styles = ({"linewidth": 2.4, "alpha": 0.6}, {"linewidth": 1.0, "linestyle": "--"})
    first = read_metrics(next(iter(runs.values())))
    for index, (label, out_dir) in enumerate(runs.items()):
        records = read_metrics(out_dir)
        for axis, key in zip(axes[:, 0], keys):
            axis.plot([r["step"] for r in records], [r[key] for r in records], label=label,
                      **styles[min(index, len(styles) - 1)])
        same = steps_with_same_rollouts(records, first)
        if index > 0 and same < min(len(records), len(first)):
            for axis in axes[:, 0]:
                axis.axvline(same + 1, color="gray", linestyle=":", linewidth=1,
                             label=f"{label}: rollouts differ from step {same + 1}" if axis is axes[0, 0] else None)
    for axis, key in zip(axes[:, 0], keys):
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
