"""Demo: the packed shared-prefix layout equals the unpacked layout, and is faster.

1. Attention alone: builds ragged GRPO batches, runs ``prefix_attention`` (backend
   "auto") on the packed layout and causal SDPA on the unpacked layout (every
   ``[prefix; completion]`` its own padded row), checks in float64 that completion outputs
   and q/k/v gradients agree, then times both (forward and forward+backward).
2. A whole model: the model suite (``benchmarks.bench_model``) at this device's shapes: a
   randomly initialized Qwen2-shaped transformers model computes the completion log-probs
   of a GRPO batch, unpacked (padded rows through SDPA) and packed (``completion_log_probs``,
   and FlexAttention where it has a backward); checks they agree and times forward+backward.

Prints PASS or FAIL for every equivalence check (and exits with status 1 on a FAIL), then
a one-line summary. Writes CSVs and PNGs under runs/demo/ (ignored by git), or refreshes the
committed ones in benchmarks/results/ with --update-results:

    python -m benchmarks.demo [--skip-model] [--update-results]
"""
from __future__ import annotations

import os
import sys

from prefix_grouper.cli_arguments import UsageErrorParser, check_device

from .arguments import add_device_arguments, add_output_arguments, check_output_arguments, output_dir

PROG = "python -m benchmarks.demo"
# torch, prefix_grouper's kernels and the benchmark plumbing are imported inside the
# functions, after the arguments are parsed: --help and usage errors need none of them.


def batches(device):
    """(name, prefix lens, completion lens per group, Hq, Hkv, D) for this device."""
    if device.type == "cuda":
        return [
            ("P4096 S512 G8", [4096], [[512] * 8], 16, 16, 128),
            ("ragged GQA", [1500, 3000, 700, 4096], [[64, 512, 300, 128, 200, 480, 96, 256]] * 4, 28, 4, 128),
            ("P1024 S1024 G8", [1024], [[1024] * 8], 16, 16, 128),
        ]
    return [
        ("P512 S64 G8", [512], [[64] * 8], 8, 8, 64),
        ("ragged GQA", [300, 700, 97], [[16, 64, 7, 33], [128, 1], [40, 50, 60, 70, 80]], 8, 2, 64),
        ("P256 S256 G4", [256], [[256] * 4], 8, 8, 64),
    ]


def check_equivalence(name, layout, q, k, v, backend):
    """Max |packed - unpacked| over completion outputs and the q/k/v gradients, with the
    packed side on the ``backend`` that gets timed (float64 where it supports it, else
    float32) and the unpacked side in float64. Prints PASS, or exits on FAIL."""
    import torch

    from prefix_grouper import prefix_attention
    from prefix_grouper.unpacked import unpacked_prefix_attention

    from .common import report_equivalence

    precision = torch.float64 if backend in ("torch", "reference") else torch.float32
    # float64: only summation-order rounding (~1e-15 relative) on O(1) values; float32
    # kernels round each of up to ~10^3 accumulated terms at 6e-8.
    tolerance = 1e-9 if precision == torch.float64 else 1e-3
    unpacked_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    packed_leaves = [x.detach().to(precision).requires_grad_() for x in (q, k, v)]
    completions = layout.completion_positions()
    unpacked = unpacked_prefix_attention(*unpacked_leaves, layout)[completions]
    packed = prefix_attention(*packed_leaves, layout, backend=backend)[completions]
    weight = torch.randn(packed.shape, dtype=torch.float64, device=packed.device)
    out_err = (unpacked - packed.double()).abs().max().item()
    grad_unpacked = torch.autograd.grad((unpacked * weight).sum(), unpacked_leaves)
    grad_packed = torch.autograd.grad((packed * weight.to(precision)).sum(), packed_leaves)
    grad_err = max((a - b.double()).abs().max().item() for a, b in zip(grad_unpacked, grad_packed))
    checked_in = str(precision).replace("torch.", "")
    report_equivalence(f"attention, {name}, backend {backend}, outputs and q/k/v gradients",
                       max(out_err, grad_err), tolerance, checked_in)
    return out_err, grad_err, checked_in


def build_parser() -> UsageErrorParser:
    parser = UsageErrorParser(prog=PROG, description=__doc__)
    add_device_arguments(parser)
    parser.add_argument("--skip-model", action="store_true", help="skip the whole-model part")
    add_output_arguments(parser, "demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_arguments(parser, args)
    args.device = str(check_device(parser, args.device))  # imports torch
    import torch

    from prefix_grouper import GroupLayout, prefix_attention
    from prefix_grouper.attention import resolve_backend
    from prefix_grouper.unpacked import unpacked_attention_rows, unpacked_rows

    from . import bench_model
    from .common import device_of, measure_ms, provenance, report_equivalence, run_suite, shared_prefix_flops, spread

    device = device_of(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = output_dir(args)
    print(f"writing results to {out_dir}", flush=True)
    torch.manual_seed(0)
    rows, checks = [], 0
    for name, prefix, suffix, hq, hkv, d in batches(device):
        layout = GroupLayout.from_lengths(prefix, suffix, device=device)
        q = torch.randn(layout.total_tokens, hq, d, device=device, dtype=dtype)
        k = torch.randn(layout.total_tokens, hkv, d, device=device, dtype=dtype)
        v = torch.randn(layout.total_tokens, hkv, d, device=device, dtype=dtype)
        backend = resolve_backend("auto", device, dtype)
        out_err, grad_err, checked_in = check_equivalence(name, layout, q, k, v, backend)
        checks += 1

        unpacked_qkv = [unpacked_rows(x, layout)[0].detach().requires_grad_() for x in (q, k, v)]
        packed_qkv = [x.detach().requires_grad_() for x in (q, k, v)]
        grad_out_unpacked = torch.randn_like(unpacked_qkv[0])
        grad_out_packed = torch.randn_like(packed_qkv[0])

        def unpacked_fwd():
            with torch.no_grad():
                unpacked_attention_rows(*unpacked_qkv)

        def packed_fwd():
            with torch.no_grad():
                prefix_attention(*packed_qkv, layout)

        def unpacked_fwd_bwd():
            unpacked_attention_rows(*unpacked_qkv).backward(grad_out_unpacked)

        def packed_fwd_bwd():
            prefix_attention(*packed_qkv, layout).backward(grad_out_packed)

        times = {label: measure_ms(fn, device) for label, fn in
                 [("unpacked_fwd", unpacked_fwd), ("packed_fwd", packed_fwd),
                  ("unpacked_fwd_bwd", unpacked_fwd_bwd), ("packed_fwd_bwd", packed_fwd_bwd)]}
        flops = shared_prefix_flops(layout, hq, d)
        rows.append({
            "suite": "demo", **provenance(device), "batch": name, "dtype": str(dtype).replace("torch.", ""),
            "backend": backend, "packed_tokens": layout.total_tokens, "unpacked_tokens": layout.unpacked_tokens(),
            "checked_in": checked_in, "max_out_err": f"{out_err:.2e}", "max_grad_err": f"{grad_err:.2e}",
            **{column: text for key, value in times.items()
               for column, text in {f"{key}_ms": f"{value:.3f}", **spread(f"{key}_ms", value)}.items()},
            "speedup_fwd": f"{times['unpacked_fwd'] / times['packed_fwd']:.2f}",
            "speedup_fwd_significant": separated(times["unpacked_fwd"], times["packed_fwd"]),
            "speedup_fwd_bwd": f"{times['unpacked_fwd_bwd'] / times['packed_fwd_bwd']:.2f}",
            "speedup_fwd_bwd_significant": separated(times["unpacked_fwd_bwd"], times["packed_fwd_bwd"]),
            "useful_tflops_fwd_bwd": f"{3.5 * flops / times['packed_fwd_bwd'] / 1e9:.3f}",
        })
    write_results(rows, device, out_dir)
    if not args.skip_model:
        model_args = bench_model.build_parser().parse_args(["--device", str(device), "--out", out_dir]
                                                           + (["--threads", str(args.threads)] if args.threads else []))
        for row in run_suite("demo_model", bench_model, model_args):
            # The unpacked rows are the reference; "nan": the approach did not run on this device.
            if row["approach"] != "unpacked" and row["max_abs_logprob_diff_vs_unpacked"] != "nan":
                report_equivalence(f"whole model, {row['config']}, {row['approach']}, completion log-probs",
                                   float(row["max_abs_logprob_diff_vs_unpacked"]), float(row["logprob_tolerance"]),
                                   row["dtype"])
                checks += 1
    speedups = ", ".join(f"{r['batch']} {r['speedup_fwd_bwd']}x" for r in rows)
    print(f"demo: {checks} of {checks} equivalence checks passed (packed == unpacked); packed vs unpacked "
          f"attention fwd+bwd: {speedups}; results in {out_dir}")
    return 0


def separated(a, b) -> bool:
    """Whether two timings' min-max ranges are apart (a ratio of their medians is significant)."""
    return a.high < b.low or b.high < a.low


def write_results(rows, device, out_dir):
    from prefix_grouper.trainers.metrics import pyplot_or_none

    from .common import bar_chart, device_name, slug, versions, write_csv

    stem = os.path.join(out_dir, f"demo_{slug(device_name(device))}")
    write_csv(rows, stem + ".csv")
    print(f"\n{device_name(device)}; {versions()}")
    header = f"{'batch':<16}{'backend':<9}{'tokens unpacked->packed':>25}{'out err':>10}{'grad err':>10}" \
             f"{'fwd ms unpacked/packed':>25}{'fwd+bwd ms unpacked/packed':>29}{'speedup':>9}"
    print(header)
    for r in rows:
        print(f"{r['batch']:<16}{r['backend']:<9}"
              f"{str(r['unpacked_tokens']) + ' -> ' + str(r['packed_tokens']):>25}"
              f"{r['max_out_err']:>10}{r['max_grad_err']:>10}"
              f"{r['unpacked_fwd_ms'] + ' / ' + r['packed_fwd_ms']:>25}"
              f"{r['unpacked_fwd_bwd_ms'] + ' / ' + r['packed_fwd_bwd_ms']:>29}{r['speedup_fwd_bwd'] + 'x':>9}"
              + ("" if r["speedup_fwd_bwd_significant"] else "  not significant: the min-max ranges overlap"))
    if pyplot_or_none(stem + ".png") is None:
        print(f"wrote {stem}.csv")
        return
    series = {label: {r["batch"]: float(r[key]) for r in rows} for key, label in
              [("unpacked_fwd_ms", "unpacked fwd"), ("packed_fwd_ms", "packed fwd"),
               ("unpacked_fwd_bwd_ms", "unpacked fwd+bwd"), ("packed_fwd_bwd_ms", "packed fwd+bwd")]}
    bar_chart(series, stem + ".png", ylabel="ms (median)",
              title=f"prefix_attention vs the unpacked layout: {device_name(device)}")
    print(f"wrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    sys.exit(main())
