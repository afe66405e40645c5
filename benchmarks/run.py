"""One benchmark runner: every suite, or some, on one device, into one folder.

    python -m benchmarks.run --suite all --quick           # CPU: every suite's smallest shape
    python -m benchmarks.run --suite attention model       # GPU: the suites' H100/H200 shapes
    python -m benchmarks.run --suite all --smoke --out /tmp/bench   # tiny shapes: the code paths only

Suites (each also runs on its own as ``python -m benchmarks.bench_<suite>``):
  attention   shared-prefix attention vs unpacked rows, split, FlexAttention (bench_attention)
  advantages  GRPO advantage kernels vs the device's copy bandwidth (bench_advantages)
  model       a Qwen2-shaped model's training step: unpacked / FlexAttention-grouped / ours (bench_model)
  training    seconds per step of the reference trainers, grouped vs unpacked (bench_training)
  log_probs   fused completion log-probs vs full logits (bench_log_probs)
  trl         trl.GRPOTrainer vs the drop-in GRPOTrainer (bench_trl)
  tree        prefix trees (system prompt, multi-turn, history, GRPO) vs unpacked rows and one level (bench_tree)

Every suite writes ``<suite>_<device>.csv`` (one row per measurement, starting with the
device, versions, git commit and UTC timestamp) and a PNG into ``--out`` (default
``runs/bench/``, ignored by git: rows of a device land only where that device ran them),
and prints its ratios against the unpacked rows and FlexAttention where it has them. A suite
that fails is reported and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from . import bench_advantages, bench_attention, bench_log_probs, bench_model, bench_training, bench_tree, bench_trl
from .common import (RUNS_DIR, add_device_arguments, add_size_arguments, device_name, device_of, provenance,
                     run_suite, slug, write_csv)

SUITES = {"attention": bench_attention, "advantages": bench_advantages, "model": bench_model,
          "training": bench_training, "log_probs": bench_log_probs, "trl": bench_trl, "tree": bench_tree}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=[*SUITES, "all"], required=True)
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--out", default=os.path.join(RUNS_DIR, "bench"),
                        help="folder for every suite's CSV and PNG (default: runs/bench/, ignored by git)")
    return parser


def suite_argv(args) -> list[str]:
    """The options every suite module's own parser takes, as the runner was given them."""
    argv = ["--device", args.device, "--out", args.out]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv + (["--quick"] if args.quick else ["--smoke"] if args.smoke else [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    seconds, failed = {}, []
    for name in names:
        module = SUITES[name]
        start = time.perf_counter()
        try:
            run_suite(name, module, module.build_parser().parse_args(suite_argv(args)))
        except Exception:  # one broken suite must not cost the others' measurements (GPU time is scarce)
            traceback.print_exc()
            failed.append(name)
        seconds[name] = time.perf_counter() - start
    print("\nseconds per suite: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items())
          + f"; total {sum(seconds.values()):.0f}")
    # The run's own wall times, stamped like every row: what a README may quote of the run.
    device = device_of(args)
    stamp = provenance(device)
    size = "quick" if args.quick else "smoke" if args.smoke else "full"
    write_csv([{"suite": name, **stamp, "size": size, "seconds": f"{s:.1f}", "failed": name in failed}
               for name, s in seconds.items()] + [{"suite": "total", **stamp, "size": size,
                                                   "seconds": f"{sum(seconds.values()):.1f}", "failed": bool(failed)}],
              os.path.join(args.out, f"run_{slug(device_name(device))}.csv"))
    if failed:
        print(f"FAILED: {', '.join(failed)} (tracebacks above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
