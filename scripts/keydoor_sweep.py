"""Success of GiGPO on the keydoor environments per environment setting and seed, with the
CLI's defaults otherwise (TrainConfig(), 200 steps, tiny model, float32, one CPU thread).

    python scripts/keydoor_sweep.py --tasks keydoor-history keydoor \
        --settings invalid_penalty=-0.02,max_steps=8 invalid_penalty=-0.02,max_steps=10 \
        --seeds 0 1 2 3 4 5 6 7 8 9 --out benchmarks/results/training/keydoor_sweep.csv

One CSV row per run, appended as each run ends: the success rate of the first step, the mean
success rate of the first and last 20 steps, the first step whose trailing 20-step mean success
reaches 0.9 (empty if none), the last 20 steps' invalid-action fraction and entropy, and the
wall time.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from prefix_grouper.trainers import TrainConfig, build_trainer

WINDOW = 20
FIELDS = ["task", "invalid_penalty", "max_steps", "seed", "steps", "success_step1", "success_first20", "success_last20",
          "step_reaching_0.9", "invalid_frac_last20", "entropy_last20", "wall_s"]


def setting(text: str) -> dict:
    """``"invalid_penalty=-0.02,max_steps=10"`` -> ``{"invalid_penalty": -0.02, "max_steps": 10}``."""
    options = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in ("invalid_penalty", "max_steps") or not value:
            raise argparse.ArgumentTypeError(f"{part!r}: expected invalid_penalty=<float> or max_steps=<int>")
        options[name] = float(value) if name == "invalid_penalty" else int(value)
    return options


def run(task: str, options: dict, seed: int, steps: int) -> dict:
    trainer = build_trainer("gigpo", task, seed=seed, config=TrainConfig(), task_options=options)
    started = time.perf_counter()
    records = [trainer.step() for _ in range(steps)]
    wall = time.perf_counter() - started

    def mean(key: str, part: list[dict]) -> float:
        return sum(r[key] for r in part) / len(part)

    reaching = next((i + 1 for i in range(WINDOW - 1, steps)
                     if mean("success_rate", records[i + 1 - WINDOW:i + 1]) >= 0.9), "")
    return {"task": task, "invalid_penalty": trainer.task.invalid_penalty, "max_steps": trainer.task.max_steps,
            "seed": seed, "steps": steps, "success_step1": f"{records[0]['success_rate']:.3f}",
            "success_first20": f"{mean('success_rate', records[:WINDOW]):.3f}",
            "success_last20": f"{mean('success_rate', records[-WINDOW:]):.3f}", "step_reaching_0.9": reaching,
            "invalid_frac_last20": f"{mean('invalid_frac', records[-WINDOW:]):.3f}",
            "entropy_last20": f"{mean('entropy', records[-WINDOW:]):.3f}", "wall_s": f"{wall:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["keydoor-history"], choices=["keydoor", "keydoor-history"])
    parser.add_argument("--settings", nargs="+", type=setting, default=[{}],
                        help="environment options, comma-separated name=value (default: the environment's defaults)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=200, help="the CLI's default number of steps")
    parser.add_argument("--out", required=True, help="CSV file (rows are appended; the header is written once)")
    args = parser.parse_args()
    if args.steps < WINDOW:
        parser.error(f"--steps must be at least {WINDOW}, got {args.steps}")
    # One thread: the tiny model gains nothing from more, and the figures stay comparable across machines.
    torch.set_num_threads(1)
    new_file = not os.path.exists(args.out)
    for task in args.tasks:
        for options in args.settings:
            for seed in args.seeds:
                row = run(task, options, seed, args.steps)
                with open(args.out, "a", newline="", encoding="utf-8") as file:
                    writer = csv.DictWriter(file, FIELDS)
                    if new_file:
                        writer.writeheader()
                        new_file = False
                    writer.writerow(row)
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
