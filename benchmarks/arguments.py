"""Command-line arguments of the benchmarks and the demo, without torch: ``python -m
benchmarks.run --help`` and its usage errors answer before torch (about 2 s) is imported.
The suite modules import these through :mod:`benchmarks.common`."""
from __future__ import annotations

import os

from prefix_grouper.cli_arguments import AUTO_DEVICE, DEVICE_HELP, check_output_dir, device_argument, positive_int

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")  # committed figures, refreshed on request
RUNS_DIR = os.path.join(REPO_ROOT, "runs")  # ignored by git: ordinary runs never dirty the work tree

# CPU timings at 2+ threads flip between runs on a shared machine (OpenMP threads contend
# with other processes; results/design_measurements.md); one thread is steady.
DEFAULT_CPU_THREADS = 1


def add_device_arguments(parser) -> None:
    """``--device`` (default: the GPU when torch sees one) and ``--threads`` (CPU threads for torch)."""
    parser.add_argument("--device", type=device_argument, default=AUTO_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"CPU threads for torch (default: {DEFAULT_CPU_THREADS} on CPU, steady timings on a "
                             f"shared or small VM; GPU runs keep torch's default)")


def add_size_arguments(parser) -> None:
    """``--quick`` (the device's smallest shapes, fewer repeats) and ``--smoke`` (tiny shapes,
    one timed call: exercises the code path, measures nothing worth quoting)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="this device's smallest shapes, fewer repeats")
    size.add_argument("--smoke", action="store_true",
                      help="tiny shapes and one timed call: checks the code path, measures nothing worth quoting")


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


def check_output_arguments(parser, args) -> None:
    """A usage error unless the folder of :func:`add_output_arguments`' options can be written."""
    check_output_dir(parser, "--update-results" if args.update_results else "--out", output_dir(args))
