"""Completion log-probs through the LM head: fused (chunked) against full logits.

Approaches, each timed forward + backward of ``loss = -sum(log p(target))`` (plus
``0.01 * sum(entropy)`` with --entropy) with respect to hidden and the head's weight:
  plain         hidden @ weight.T in the input dtype, log_softmax in float32, gather
                (what TRL/verl do without a fused head)
  fused-torch   prefix_grouper.fused_linear_log_probs(backend="torch")
  fused-triton  prefix_grouper.fused_linear_log_probs(backend="triton") (CUDA only)
  liger         Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="sum"), the same
                loss (where liger-kernel is installed; no entropy, so not with --entropy)

Every approach's log-probs and gradients are compared with plain's before timing (max abs
difference, in the CSV). Peak extra memory is what the step allocates beyond its inputs:
torch.cuda.max_memory_allocated on GPU; on CPU the process's peak resident size (VmHWM,
reset through /proc/self/clear_refs after glibc's malloc_trim) above its resident size before the step.

    python -m benchmarks.bench_log_probs --device cpu          # C=512 V=8192 H=256, seconds
    python -m benchmarks.bench_log_probs                       # GPU: C 2048..32768, V=151936, bf16

Writes log_probs_<device>.csv, .png and _memory.png into --out (default runs/bench_log_probs/);
``python -m benchmarks.run --suite log_probs`` runs the same.
"""
from __future__ import annotations

import argparse
import sys

import torch

from prefix_grouper import fused_linear_log_probs

from .common import (add_device_arguments, add_output_arguments, add_size_arguments, bar_chart, measure_ms,
                     peak_extra_mib, ratios as ratios_of, repeats_of, run_suite, spread, suite_setup)

# (rows C, hidden H, vocab V)
GPU_CONFIGS = [(rows, width, 151936) for width in (1536, 3584) for rows in (2048, 8192, 32768)]
CPU_CONFIGS, CPU_CHUNK_SIZE = [(512, 256, 8192)], 128
SMOKE_CONFIGS, SMOKE_CHUNK_SIZE = [(64, 32, 512)], 16
ENTROPY_WEIGHT = 0.01


def liger_loss():
    """Liger-Kernel's fused linear cross-entropy module, or None where it is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def plain_log_probs(hidden, weight, targets, with_entropy):
    log_p = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    log_probs = log_p.gather(1, targets[:, None]).squeeze(1)
    return log_probs, (-(log_p.exp() * log_p).sum(-1) if with_entropy else None)


def approaches(device: torch.device, with_entropy: bool, chunk_size: int | None) -> dict:
    """name -> fn(hidden, weight, targets) returning (loss, log_probs)."""
    def combine(log_probs, entropy):
        loss = -log_probs.sum()
        return (loss + ENTROPY_WEIGHT * entropy.sum() if with_entropy else loss), log_probs

    def fused(backend):
        return lambda h, w, t: combine(*fused_linear_log_probs(h, w, t, return_entropy=True, chunk_size=chunk_size,
                                                                    backend=backend))

    table = {"plain": lambda h, w, t: combine(*plain_log_probs(h, w, t, with_entropy)),
             "fused-torch": fused("torch")}
    if device.type == "cuda":
        table["fused-triton"] = fused("triton")
        liger = liger_loss()
        if liger is not None and not with_entropy:
            # Liger returns only the summed loss: its log-probs are not compared, its gradients are.
            table["liger"] = lambda h, w, t: (liger(w, h, t), None)
    return table


def run_config(rows, width, vocab, dtype, device, with_entropy, chunk_size, names, repeats):
    gen = torch.Generator().manual_seed(rows + width)
    # Scaled like a trained head: logits of a few units, not sqrt(H).
    hidden = (torch.randn(rows, width, generator=gen) / width**0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 2).to(device, dtype).requires_grad_()
    targets = torch.randint(vocab, (rows,), generator=gen).to(device)
    table = approaches(device, with_entropy, chunk_size)

    def step(fn):
        hidden.grad = weight.grad = None
        loss, log_probs = fn(hidden, weight, targets)
        loss.backward()
        return log_probs

    results, baseline = [], None
    for name in names or table:
        if name not in table:
            continue
        fn = table[name]
        try:
            log_probs = step(fn)
            outputs = [None if log_probs is None else log_probs.detach().float(), hidden.grad.float(),
                       weight.grad.float()]
            if name == "plain":
                baseline = outputs
            # NaN when plain did not run (not selected, or out of memory): nothing to compare with.
            max_err = float("nan") if baseline is None else max(
                (got - want).abs().max().item() for got, want in zip(outputs, baseline) if got is not None)
            ms = measure_ms(lambda: step(fn), device, *repeats)
            mib = peak_extra_mib(lambda: step(fn), device)
        except torch.OutOfMemoryError:
            ms = mib = max_err = float("nan")
        timing = spread("fwd_bwd_ms", ms)
        hidden.grad = weight.grad = None
        results.append(dict(config=f"C{rows} V{vocab} H{width}", approach=name, dtype=str(dtype).split(".")[-1],
                            entropy=with_entropy, fwd_bwd_ms=round(ms, 3), **timing, peak_extra_mib=round(mib, 1),
                            max_abs_diff_vs_plain=max_err))
        print(f"{results[-1]['config']:>22} {name:>13}: {ms:9.2f} ms  {mib:9.1f} MiB extra  "
              f"max|diff vs plain| {max_err:.2e}", flush=True)
    return results


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are not representative)")
    parser.add_argument("--configs", nargs="*", help='"C,H" pairs (default: every config of this device)')
    parser.add_argument("--vocab", type=int, help="V (default: the config's, 151936 on GPU, 8192 on CPU)")
    parser.add_argument("--approaches", nargs="*", help="names to run (default: all available)")
    parser.add_argument("--entropy", action="store_true", help="add 0.01 * sum(entropy) to the loss")
    parser.add_argument("--chunk-size", type=int,
                        help=f"rows per chunk of the fused approaches (default: the library's 256 MiB budget on GPU; "
                             f"{CPU_CHUNK_SIZE} on CPU, where that budget would hold the small shape in one chunk)")
    add_output_arguments(parser, "bench_log_probs")
    return parser


def run(args) -> list[dict]:
    """One row per config and approach for :func:`build_parser`'s options."""
    device, dtype, configs = suite_setup(args, gpu=GPU_CONFIGS, cpu=CPU_CONFIGS, smoke=SMOKE_CONFIGS)
    on_gpu = device.type == "cuda"
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    if args.configs:
        vocab = configs[0][2]
        configs = [(*(int(x) for x in c.split(",")), vocab) for c in args.configs]
    chunk_size = args.chunk_size or (SMOKE_CHUNK_SIZE if args.smoke else None if on_gpu else CPU_CHUNK_SIZE)
    return [r for rows, width, vocab in configs
            for r in run_config(rows, width, args.vocab or vocab, dtype, device, args.entropy, chunk_size,
                                args.approaches, repeats_of(args))]


def summary(rows) -> list[str]:
    return []  # each row is printed as it is measured


def ratios(rows) -> list[dict]:
    return ratios_of(rows, config="config", approach="approach", metric="fwd_bwd_ms", baselines=("plain",))


def plot(rows, path, where):
    """fwd+bwd time into ``path``, peak extra memory into ``<path>_memory.png``."""
    title = f"fused linear log-probs, fwd+bwd, {rows[0]['dtype']}, {where}"
    series_ms, series_mib = {}, {}
    for r in rows:
        series_ms.setdefault(r["approach"], {})[r["config"]] = r["fwd_bwd_ms"]
        series_mib.setdefault(r["approach"], {})[r["config"]] = r["peak_extra_mib"]
    spread = len({r["config"] for r in rows}) > 1  # C from 2048 to 32768 on GPU: a log axis keeps all readable
    bar_chart(series_ms, path, ylabel="fwd+bwd ms", title=title, log_scale=spread)
    bar_chart(series_mib, path.removesuffix(".png") + "_memory.png", ylabel="peak extra MiB", title=title,
              log_scale=spread)


def main():
    run_suite("log_probs", sys.modules[__name__], build_parser().parse_args())


if __name__ == "__main__":
    main()
