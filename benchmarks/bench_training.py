"""Seconds per training step of the reference trainers, grouped (packed) vs unpacked log-probs.

Two trainers are built alike (``prefix_grouper.trainers.build_trainer``, the same seed, the
default tiny model and batch of ``python -m prefix_grouper.train``), one computing its
log-probs from the grouped forward, one from the unpacked ``[prompt; completion]`` rows
(``--no-prefix-grouper``). Each runs the same number of steps; a step is a rollout
(sampling, identical work both ways) and the update on it (``Trainer.train_step``: the
log-probs forward, loss and backward, optimizer step), timed apart. The first
``warm-up`` steps are not timed; medians of the rest are reported.

    python -m benchmarks.bench_training --algos grpo gigpo
    python -m benchmarks.bench_training --quick          # grpo only, 1 + 3 steps

Writes ``training_<device>.csv`` and ``.png`` under ``runs/bench_training/`` (or ``--out``
/ ``--update-results``); ``python -m benchmarks.run --suite training`` runs the same.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from prefix_grouper.trainers import ALGORITHMS, DEFAULT_TASKS, TrainConfig, build_trainer

from .common import (add_device_arguments, add_output_arguments, add_size_arguments, bar_chart, device_of,
                     Timing, ratios as ratios_of, repeats_of, run_suite, spread)

SMOKE_BATCH = dict(prompts_per_step=2, group_size=2)  # rows per step: 4 instead of the default 64


def timed_s(fn, device: torch.device):
    """``(fn(), seconds)`` with the device synchronized on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def bench_algo(algo: str, device: torch.device, batch: dict, repeats: tuple[int, int]) -> list[dict]:
    warmup, timed_steps = repeats
    rows = []
    for grouped in (True, False):
        trainer = build_trainer(algo, device=str(device), seed=0,
                                config=TrainConfig(use_prefix_grouper=grouped, **batch))
        rollout_s, update_s, packed, unpacked = [], [], [], []
        for step in range(warmup + timed_steps):
            rollout, rollout_seconds = timed_s(trainer.rollout, device)
            metrics, update_seconds = timed_s(lambda: trainer.train_step(rollout), device)
            if step >= warmup:
                rollout_s.append(rollout_seconds)
                update_s.append(update_seconds)
                packed.append(metrics["tokens_packed"])
                unpacked.append(metrics["tokens_unpacked"])
        rollout, update = Timing(rollout_s), Timing(update_s)
        whole = Timing([r + u for r, u in zip(rollout_s, update_s)])
        rows.append({
            "config": f"{algo} on {DEFAULT_TASKS[algo]}", "approach": "prefix_grouper" if grouped else "unpacked",
            "rows_per_step": trainer.config.prompts_per_step * trainer.config.group_size,
            "warmup_steps": warmup, "timed_steps": timed_steps,
            "tokens_packed_per_step": statistics.mean(packed), "tokens_unpacked_per_step": statistics.mean(unpacked),
            "rollout_s": f"{rollout:.3f}", **spread("rollout_s", rollout), "update_s": f"{update:.3f}",
            **spread("update_s", update), "step_s": f"{whole:.3f}", **spread("step_s", whole),
        })
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--algos", nargs="*", choices=ALGORITHMS,
                        help="default: all (--quick and --smoke: grpo)")
    add_output_arguments(parser, "bench_training")
    return parser


def run(args) -> list[dict]:
    """One row per algorithm and layout for :func:`build_parser`'s options."""
    device = device_of(args)
    algos = args.algos or (["grpo"] if args.quick or args.smoke else list(ALGORITHMS))
    batch = SMOKE_BATCH if args.smoke else {}
    return [row for algo in algos for row in bench_algo(algo, device, batch, repeats_of(args))]


def summary(rows) -> list[str]:
    lines = [f"{r['config']}, {r['approach']}: rollout {r['rollout_s']} s + update {r['update_s']} s "
             f"(tokens per step {r['tokens_unpacked_per_step']:.0f} unpacked, {r['tokens_packed_per_step']:.0f} packed)"
             for r in rows]
    return lines


def ratios(rows) -> list[dict]:
    return [r for metric in ("update_s", "step_s")
            for r in ratios_of(rows, config="config", approach="approach", metric=metric, baselines=("unpacked",))]


def plot(rows, path, where):
    series = {}
    for r in rows:
        series.setdefault(f"{r['approach']} update", {})[r["config"]] = float(r["update_s"])
        series.setdefault(f"{r['approach']} whole step", {})[r["config"]] = float(r["step_s"])
    bar_chart(series, path, ylabel="seconds per step (median)", title=f"reference trainers, tiny model: {where}")


def main():
    run_suite("training", sys.modules[__name__], build_parser().parse_args())


if __name__ == "__main__":
    main()
