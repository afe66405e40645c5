"""Shared-prefix attention against the approaches users would pick instead.

Approaches (each on the same packed q/k/v, checked against ours before timing):
  unpacked every [prefix; completion] its own row, SDPA causal (flash on GPU), one padded batch
  looped   the same rows unpadded, one SDPA call per row (what a loop over sequences runs)
  split    the public prefix-grouper package's scheme: prefix SDPA causal + completion
           SDPA over [prefix K/V repeated G times; own K/V] with bottom-right causal, concat
  flex     PyTorch FlexAttention with a prefix-sharing block mask, torch.compile'd
           (forward only on CPU: FlexAttention has no CPU backward)
  flashattn flash_attn_varlen_func on the unpacked rows (GPU, where flash-attn is installed)
  torch / triton / flash   prefix_attention backends of this package (triton on GPU only: on
           CPU it is the interpreter; flash where it takes the call: CUDA, bf16/fp16, head dim a
           multiple of 8, a softcap only on the flash_attn engine; elsewhere its row holds flash's
           refusal in ``note`` and no time)

Every approach is warmed up (compiled, autotuned) in exactly the mode it is then timed in,
forward under no_grad and forward+backward with grad, and the warm-up time is reported on
its own. A TorchDynamo compilation during the timed region is flagged
(recompiled_during_timing): the timing would not be of the compiled kernel.

Reports fwd and fwd+bwd median ms, peak extra memory (GPU) and useful TFLOP/s (only the
FLOPs of the shared-prefix pattern; fwd+bwd counted as 3.5x fwd). Writes CSV + PNG named
after the device under runs/bench_attention/ (or benchmarks/results/ with --update-results);
``python -m benchmarks.run --suite attention`` runs the same:

    python -m benchmarks.bench_attention                       # every config of this device
    python -m benchmarks.bench_attention --quick               # the device's smallest config
    python -m benchmarks.bench_attention --configs "P256 S128 G4 GQA" --approaches flex torch
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention import available_backends
from prefix_grouper.unpacked import packed_from_unpacked, unpacked_attention_rows, unpacked_rows

from .attention_contenders import Approach, looped_rows, make_flex, run_looped, run_split
from .common import (DEFAULT_CPU_THREADS, REPO_ROOT, add_device_arguments, add_output_arguments, add_size_arguments,
                     bar_chart, flash_refusal, measure_interleaved_ms, measure_ms, peak_extra_mib, ratios as ratios_of,
                     repeats_of, run_suite, shared_prefix_flops, spread, suite_setup, table_lines)


def ragged_completions(num_groups, group_size, low, high, seed):
    """Completion lengths drawn uniformly in [low, high], reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high + 1, (group_size,), generator=gen).tolist() for _ in range(num_groups)]


GPU_CONFIGS = [  # name, prefix lens, completion lens per group, Hq, Hkv, D
    ("P4096 S512 G8", [4096], [[512] * 8], 16, 16, 128),
    ("P8192 S512 G16", [8192], [[512] * 16], 16, 16, 128),
    ("P1024 S1024 G8", [1024], [[1024] * 8], 16, 16, 128),
    ("P2048 S256 G16 d64", [2048], [[256] * 16], 32, 32, 64),
    ("ragged GQA 4 groups", [1500, 3000, 700, 4096],
     [[64, 512, 300, 128, 200, 480, 96, 256], [100, 400, 64, 512, 333, 250, 77, 190],
      [512, 64, 128, 256, 300, 400, 500, 450], [80, 160, 240, 320, 400, 480, 64, 128]], 28, 4, 128),
    ("ragged GQA 8x2048 G16", [2048] * 8, ragged_completions(8, 16, 128, 1024, seed=1), 28, 4, 128),
    ("ragged GQA 8000+6000 G8", [8000, 6000], ragged_completions(2, 8, 256, 2048, seed=2), 28, 4, 128),
    # The attention of the model suite's two Qwen2.5 shapes (bench_model.py).
    ("Qwen2.5-1.5B attn P4096 S256 G8", [4096], [[256] * 8], 12, 2, 128),
    ("Qwen2.5-0.5B attn P4096 S256 G8", [4096], [[256] * 8], 14, 2, 64),
]
CPU_CONFIGS = [  # smallest first: --quick runs only the first
    ("P256 S128 G4 GQA", [256], [[128] * 4], 8, 2, 64),
    ("P512 S64 G8", [512], [[64] * 8], 8, 8, 64),
    # Little or nothing shared (issue 27): many small groups, G=1.
    ("64x P128 S16 G1", [128] * 64, [[16]] * 64, 8, 8, 64),
    ("64x P128 S16 G2", [128] * 64, [[16] * 2] * 64, 8, 8, 64),
    ("64x P128 S16 G8", [128] * 64, [[16] * 8] * 64, 8, 8, 64),
    ("16x P512 S64 G1", [512] * 16, [[64]] * 16, 8, 8, 64),
    # The memory shapes of issue 27.
    ("2x P256 S256 G4", [256] * 2, [[256] * 4] * 2, 8, 8, 64),
    ("2x P1024 S128 G8", [1024] * 2, [[128] * 8] * 2, 8, 8, 64),
]
SMOKE_CONFIGS = [("smoke P64 S16 G2 GQA", [64], [[16] * 2], 4, 2, 16)]
# Model features (issue 15): an optional 7th entry of prefix_attention keywords, ``sinks``
# True for random [Hq] sinks. Only this package's backends implement them, so only they
# run, and TFLOP/s count only the work a window leaves visible: a window that skips the
# hidden key blocks keeps the TFLOP/s of the full pattern at a lower time.
FEATURE_GPU_CONFIGS = [
    ("P8192 S512 G8 no window", [8192], [[512] * 8], 16, 16, 128, {"window": None}),
    ("P8192 S512 G8 window 4096", [8192], [[512] * 8], 16, 16, 128, {"window": 4096}),
    ("P8192 S512 G8 window 1024", [8192], [[512] * 8], 16, 16, 128, {"window": 1024}),
    ("P8192 S512 G8 softcap 50", [8192], [[512] * 8], 16, 16, 128, {"softcap": 50.0}),
    ("P8192 S512 G8 sinks", [8192], [[512] * 8], 16, 16, 128, {"sinks": True}),
]
FEATURE_SMOKE_CONFIGS = [("smoke window softcap sinks", [64], [[16] * 2], 4, 2, 16,
                          {"window": 24, "softcap": 20.0, "sinks": True})]
BASELINES = ("unpacked", "looped", "flex")
CPU_ROUNDS = 9
"""Interleaved fwd+bwd rounds on CPU at least: enough for min-max ranges that separate."""


def visible_flops(layout, heads, head_dim, window=None):
    """:func:`shared_prefix_flops`, or with a window only the visible pairs' FLOPs (4 d per
    query-key pair and head): a query at position i sees min(i + 1, window) keys."""
    if window is None:
        return shared_prefix_flops(layout, heads, head_dim)
    visible = (layout.position_ids + 1).clamp(max=window).sum().item()
    return 4 * head_dim * heads * visible


def package_backends(layout, device, dtype, head_dim, features) -> dict:
    """``{backend: maker of its Approach}`` of this package's backends with ``features``
    (prefix_attention keywords): those that run on ``device`` (not the reference; not Triton's
    CPU interpreter, whose timings say nothing about the kernels), then flash, run or refused."""
    packed = lambda q, k, v: (q, k, v)  # noqa: E731

    def maker(backend):
        return lambda: Approach(packed, lambda q, k, v: prefix_attention(q, k, v, layout, backend=backend,
                                                                         **features))

    makers = {backend: maker(backend) for backend in available_backends(device)
              if backend not in ("reference", "flash") and not (backend == "triton" and device.type != "cuda")}
    # Flash refuses per call (dtype, softcap, head dim), not per device as available_backends asks.
    refusal = flash_refusal(device, dtype, head_dim, features.get("softcap"))
    makers["flash"] = maker("flash") if refusal is None else lambda: Approach(packed, None, unavailable=refusal)
    return makers


def approaches(layout, device, dtype, head_dim, wanted=None, features=None):
    """``{name: Approach}`` for this layout, device, dtype and head dim (only the names in
    ``wanted``, if given); with ``features`` (prefix_attention keywords), only this package's
    backends."""
    ours = package_backends(layout, device, dtype, head_dim, features or {})
    if features:
        return {name: make() for name, make in ours.items() if wanted is None or name in wanted}
    packed = lambda q, k, v: (q, k, v)  # noqa: E731
    rows = lambda q, k, v: tuple(unpacked_rows(x, layout)[0] for x in (q, k, v))  # noqa: E731
    makers = {"unpacked": lambda: Approach(rows, unpacked_attention_rows),
              "looped": lambda: Approach(lambda q, k, v: looped_rows(q, k, v, layout), run_looped)}
    if layout.num_groups == 1 and len(set(layout.suffix_lens_list)) == 1:
        makers["split"] = lambda: Approach(packed, lambda q, k, v: run_split(q, k, v, layout))
    makers["flex"] = lambda: Approach(packed, make_flex(layout), backward=device.type == "cuda")
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_varlen_func

            def make_flashattn():
                lengths = layout.prefix_lens[layout.completion_group] + layout.suffix_lens
                cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
                max_len = int(lengths.max())
                real = torch.arange(max_len, device=device)[None] < lengths[:, None]  # [N, L] not padding
                return Approach(lambda q, k, v: tuple(x[real] for x in rows(q, k, v)),
                                lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len,
                                                                       causal=True))

            makers["flashattn"] = make_flashattn
        except ImportError:
            pass
    makers.update(ours)
    return {name: make() for name, make in makers.items() if wanted is None or name in wanted}


def completion_view(name, out, layout):
    """Completion-token outputs ``[completion tokens, H, D]`` in packed order, for every approach."""
    if name == "flashattn":  # the unpacked rows' real tokens, concatenated
        lengths = layout.prefix_lens[layout.completion_group] + layout.suffix_lens
        real = torch.arange(int(lengths.max()), device=out.device)[None] < lengths[:, None]
        padded = out.new_zeros(*real.shape, *out.shape[1:])
        padded[real] = out
        out = padded
    if name == "looped":
        out = packed_from_unpacked(torch.nn.utils.rnn.pad_sequence(list(out), batch_first=True), layout)
    if name in ("unpacked", "flashattn"):
        out = packed_from_unpacked(out, layout)
    return out[layout.completion_positions()]


def compilations() -> int:
    """TorchDynamo frame compilations so far in this process (each cache miss counts)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def warm_then_time(fn, device, repeats):
    """``(first output, warm-up s, median ms, recompiled)``: the first call of ``fn`` compiles
    or autotunes, then ``fn`` is timed (``repeats``: :func:`repeats_of`'s pair); ``recompiled``
    says Dynamo compiled during timing."""
    start = time.perf_counter()
    first = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - start
    before = compilations()
    ms = measure_ms(fn, device, *repeats)
    return first, warmup_s, ms, compilations() != before


def bench_config(name, prefix, suffix, hq, hkv, d, device, dtype, wanted, repeats, features=None):
    layout = GroupLayout.from_lengths(prefix, suffix, device=device)
    t = layout.total_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(t, h, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    features = dict(features or {})
    if features.pop("sinks", False):
        features["sinks"] = torch.randn(hq, device=device, generator=gen)
    flops = visible_flops(layout, hq, d, features.get("window"))
    ours = prefix_attention(q, k, v, layout, **features)[layout.completion_positions()].float()
    # Outputs are O(1) (softmax-weighted averages of unit-normal values): a few ulps of the
    # dtype after rounding, not a mask or position error (which moves them by ~0.1).
    agreement = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    nan = float("nan")

    def row(approach, err=nan, fwd_warmup_s=nan, fwd_ms=nan, fwd_bwd_warmup_s=nan, fwd_bwd_ms=nan, peak_gib=nan,
            recompiled=False, note=""):  # peak_gib: on CPU, a fresh process's peak extra resident memory
        return {
            "config": name, "approach": approach, "dtype": str(dtype).replace("torch.", ""),
            "hq": hq, "hkv": hkv, "d": d,
            "tokens": t, "max_abs_diff_vs_ours": f"{err:.3e}", "agrees": "" if note else err <= agreement,
            "fwd_warmup_s": f"{fwd_warmup_s:.2f}", "fwd_ms": f"{fwd_ms:.3f}", **spread("fwd_ms", fwd_ms),
            "fwd_bwd_warmup_s": f"{fwd_bwd_warmup_s:.2f}", "fwd_bwd_ms": f"{fwd_bwd_ms:.3f}",
            **spread("fwd_bwd_ms", fwd_bwd_ms),
            "recompiled_during_timing": recompiled,
            "peak_extra_gib": f"{peak_gib:.3f}",
            "useful_tflops_fwd": f"{flops / fwd_ms / 1e9:.2f}",
            "useful_tflops_fwd_bwd": f"{3.5 * flops / fwd_bwd_ms / 1e9:.2f}",
            "note": note,
        }

    rows, measured = [], {}  # approach -> [fwd+bwd closure, its row's fields]
    for approach, provider in approaches(layout, device, dtype, d, wanted, features).items():
        if provider.unavailable:
            print(f"{name}, {approach}: not run: {provider.unavailable}", flush=True)
            rows.append(row(approach, note=f"not run: {provider.unavailable}"))
            continue
        inputs = provider.prepare(q, k, v)
        leaves = [[y.detach().requires_grad_() for y in x] if isinstance(x, list) else x.detach().requires_grad_()
                  for x in inputs]

        def fwd():
            with torch.no_grad():
                return provider.run(*inputs)

        out, fwd_warmup_s, fwd_ms, recompiled_fwd = warm_then_time(fwd, device, repeats)
        err = (completion_view(approach, out, layout).float() - ours).abs().max().item()
        if err > agreement:
            print(f"WARNING: {approach} differs from prefix_attention by {err:.2e} on {name}")
        fields = dict(approach=approach, err=err, fwd_warmup_s=fwd_warmup_s, fwd_ms=fwd_ms, recompiled=recompiled_fwd)
        if provider.backward:
            grad_out = [torch.randn_like(x) for x in out] if isinstance(out, list) else torch.randn_like(out)
            measured[approach] = ((lambda run, leaves, grad_out: lambda: run(*leaves).backward(grad_out))(
                provider.run, leaves, grad_out), fields)
        else:
            rows.append(row(**fields))
    if device.type == "cuda":
        for approach, (fwd_bwd, fields) in measured.items():
            _, fields["fwd_bwd_warmup_s"], fields["fwd_bwd_ms"], recompiled = warm_then_time(fwd_bwd, device, repeats)
            fields["recompiled"] |= recompiled
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            fields["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    elif measured:
        # On a shared CPU the contenders take turns, round after round, so that a burst of load
        # elsewhere hits them all; peak memory in a fresh process per contender.
        before = compilations()
        rounds = repeats[1] if repeats[1] == 1 else max(CPU_ROUNDS, repeats[1])  # --smoke: one
        warmups, times = measure_interleaved_ms({a: f for a, (f, _) in measured.items()}, (repeats[0], rounds))
        for approach, (_, fields) in measured.items():
            fields.update(fwd_bwd_warmup_s=warmups[approach], fwd_bwd_ms=times[approach],
                          peak_gib=fresh_peak_mib(name, approach, features) / 1024)
            fields["recompiled"] |= compilations() != before
    for approach, (_, fields) in measured.items():
        rows.append(row(**fields))
        if fields["recompiled"]:
            print(f"WARNING: {approach} recompiled while it was timed on {name}: that time is not of its compiled kernel")
    return rows


def fresh_peak_mib(config: str, approach: str, features: dict) -> float:
    """Peak extra resident memory of one fwd+bwd of ``approach`` on CPU config ``config``, in a
    fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks go back to the system when
    freed, so the resident size follows live memory); NaN with features (not measured there)."""
    if features:
        return float("nan")
    script = ("import sys; from benchmarks.bench_attention import peak_in_this_process as p; "
              "print(p(sys.argv[1], sys.argv[2]))")
    result = subprocess.run([sys.executable, "-c", script, config, approach], capture_output=True, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=600)
    if result.returncode:
        print(f"WARNING: peak memory of {approach} on {config} not measured: {result.stderr[-300:]}")
        return float("nan")
    return float(result.stdout.split()[-1])


def peak_in_this_process(config: str, approach: str) -> float:
    """:func:`fresh_peak_mib`'s child: inputs and the approach's rows prepared, then the peak
    extra MiB of one fwd+bwd (:func:`peak_extra_mib`)."""
    torch.set_num_threads(DEFAULT_CPU_THREADS)
    name, prefix, suffix, hq, hkv, d = next(c for c in CPU_CONFIGS + SMOKE_CONFIGS if c[0] == config)[:6]
    device = torch.device("cpu")
    layout = GroupLayout.from_lengths(prefix, suffix, device=device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.total_tokens, h, d, generator=gen) for h in (hq, hkv, hkv))
    provider = approaches(layout, device, torch.float32, d, [approach])[approach]
    leaves = [[y.detach().requires_grad_() for y in x] if isinstance(x, list) else x.detach().requires_grad_()
              for x in provider.prepare(q, k, v)]
    with torch.no_grad():
        out = provider.run(*leaves)
    grad_out = [torch.randn_like(x) for x in out] if isinstance(out, list) else torch.randn_like(out)
    del out
    return peak_extra_mib(lambda: provider.run(*leaves).backward(grad_out), device)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--configs", nargs="*", help="names of configs to run (default: all of this device)")
    parser.add_argument("--approaches", nargs="*", help="names of approaches to run (default: all available)")
    add_output_arguments(parser, "bench_attention")
    return parser


def run(args) -> Iterator[dict]:
    """One row per config and approach for :func:`build_parser`'s options, each as soon as measured."""
    device, dtype, configs = suite_setup(args, gpu=GPU_CONFIGS + FEATURE_GPU_CONFIGS, cpu=CPU_CONFIGS,
                                         smoke=SMOKE_CONFIGS + FEATURE_SMOKE_CONFIGS)
    if args.configs:
        unknown = set(args.configs) - {c[0] for c in configs}
        if unknown:
            raise ValueError(f"--configs: unknown {sorted(unknown)}; this run has {[c[0] for c in configs]}")
        configs = [c for c in configs if c[0] in args.configs]
    written = 0  # rows, measured or saying why not
    for config in tqdm(configs, desc="attention configs"):
        name, prefix, suffix, hq, hkv, d, *features = config
        for row in bench_config(name, prefix, suffix, hq, hkv, d, device, dtype, args.approaches, repeats_of(args),
                                *features):
            written += 1
            yield row
    if not written:
        raise ValueError(f"--approaches: none of {args.approaches} runs on {device}")


def summary(rows) -> list[str]:
    """The table of medians (the min-max ranges are in the CSV)."""
    lines = table_lines(rows, [
        ("config", -32, "config"), ("approach", -10, "approach"),
        ("warm-up s", 11, lambda r: f"{r['fwd_warmup_s']}+{r['fwd_bwd_warmup_s']}"), ("fwd ms", 10, "fwd_ms"),
        ("fwd+bwd ms", 12, "fwd_bwd_ms"), ("peak GiB", 10, "peak_extra_gib"), ("TF/s fwd", 10, "useful_tflops_fwd"),
        ("TF/s f+b", 10, "useful_tflops_fwd_bwd"), ("diff", 11, "max_abs_diff_vs_ours"),
        ("", 0, lambda r: "  RECOMPILED" if r["recompiled_during_timing"] else ""),
        ("", 0, lambda r: f"  {r['note']}" if r["note"] else "")])
    return lines


def ratios(rows) -> list[dict]:
    """fwd and fwd+bwd speed-ups against the baselines, each marked significant or not."""
    return [r for metric in ("fwd_ms", "fwd_bwd_ms")
            for r in ratios_of(rows, config="config", approach="approach", metric=metric, baselines=BASELINES)]


def plot(rows, path, where):
    """fwd+bwd times per config and approach (forward-only approaches: their forward time; an
    approach not run on a config: no bar)."""
    series = {}
    for r in rows:
        if r["note"]:
            continue
        label = r["approach"] if r["fwd_bwd_ms"] != "nan" else f"{r['approach']} (fwd only)"
        series.setdefault(label, {})[r["config"]] = float(r["fwd_bwd_ms"] if r["fwd_bwd_ms"] != "nan"
                                                          else r["fwd_ms"])
    bar_chart(series, path, ylabel="ms (median, log)", log_scale=True,
              title=f"shared-prefix attention, fwd+bwd: {where}")


def main():
    run_suite("attention", sys.modules[__name__], build_parser().parse_args())


if __name__ == "__main__":
    main()
