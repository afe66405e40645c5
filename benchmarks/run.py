"""One benchmark runner: every suite, or some, on one device, into one folder.

    python -m benchmarks.run --suite all --quick           # CPU: every suite's smallest shape
    python -m benchmarks.run --suite attention model       # GPU: the suites' H100/H200 shapes
    python -m benchmarks.run --suite all --smoke --out /tmp/bench   # tiny shapes: the code paths only

Suites (each also runs on its own as ``python -m benchmarks.bench_<suite>``):
{suites}

Every suite writes ``<suite>_<device>.csv`` (one row per measurement, starting with the
device, versions, git commit and UTC timestamp) and a PNG into ``--out`` (default
``runs/bench/``, ignored by git: rows of a device land only where that device ran them),
and prints its ratios against the unpacked rows and FlexAttention where it has them. A suite
that fails is reported in one line (its traceback in ``<out>/<suite>_traceback.txt``) and
the others still run; the exit status is then 1. Usage errors exit with status 2.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback

from prefix_grouper.cli_arguments import UsageErrorParser, check_device, check_output_dir

from .arguments import RUNS_DIR, add_device_arguments, add_size_arguments

PROG = "python -m benchmarks.run"
# Each suite is the module benchmarks.bench_<name>, imported (with torch) only to run it.
SUITES = {
    "attention": "shared-prefix attention vs unpacked rows, split, FlexAttention",
    "advantages": "GRPO advantage kernels vs the device's copy bandwidth",
    "model": "a Qwen2-shaped model's training step: unpacked / FlexAttention-grouped / ours",
    "training": "seconds per step of the reference trainers, grouped vs unpacked",
    "log_probs": "fused completion log-probs vs full logits",
    "trl": "trl.GRPOTrainer vs the drop-in GRPOTrainer",
    "tree": "prefix trees (system prompt, multi-turn, history, GRPO) vs unpacked rows and one level",
}


def suite_module(name: str):
    return importlib.import_module(f"benchmarks.bench_{name}")


def build_parser() -> UsageErrorParser:
    parser = UsageErrorParser(prog=PROG, synopsis="--suite {all,%s} [...] [options]" % ",".join(SUITES),
                              description=__doc__.format(suites="\n".join(f"  {name:<11} {text}"
                                                                          for name, text in SUITES.items())))
    parser.add_argument("--suite", nargs="+", choices=[*SUITES, "all"], required=True, metavar="SUITE",
                        help=f"suites to run, in this order: {', '.join(SUITES)}, or all (required)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_dir(parser, "--out", args.out)
    args.device = str(check_device(parser, args.device))  # imports torch
    from .common import device_name, device_of, provenance, run_suite, slug, write_csv

    names = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    seconds, failed = {}, []
    for name in names:
        start = time.perf_counter()
        try:
            module = suite_module(name)
            run_suite(name, module, module.build_parser().parse_args(suite_argv(args)))
        except Exception as error:  # one broken suite must not cost the others' measurements (GPU time is scarce)
            where = os.path.join(args.out, f"{name}_traceback.txt")
            os.makedirs(args.out, exist_ok=True)
            with open(where, "w") as f:
                f.write(traceback.format_exc())
            text = str(error).strip().splitlines()
            print(f"{PROG}: suite {name} failed: {type(error).__name__}: {text[0] if text else ''} (rows measured "
                  f"before it are kept in its CSV; traceback in {where})", file=sys.stderr, flush=True)
            failed.append(name)
        seconds[name] = time.perf_counter() - start
    print("\nseconds per suite: " + ", ".join(f"{name} {s:.0f}" for name, s in seconds.items())
          + f"; total {sum(seconds.values()):.0f}")
    # The run's own wall times, stamped like every row: what a README may quote of the run.
    device = device_of(args)
    stamp = provenance(device)
    size = "quick" if args.quick else "smoke" if args.smoke else "full"
    summary = os.path.join(args.out, f"run_{slug(device_name(device))}.csv")
    write_csv([{"suite": name, **stamp, "size": size, "seconds": f"{s:.1f}", "failed": name in failed}
               for name, s in seconds.items()] + [{"suite": "total", **stamp, "size": size,
                                                   "seconds": f"{sum(seconds.values()):.1f}", "failed": bool(failed)}],
              summary)
    passed = [name for name in names if name not in failed]
    print(f"{len(passed)} of {len(names)} suites ran" + (f", FAILED: {', '.join(failed)}" if failed else "")
          + f"; results in {args.out} (wall times in {summary})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
