"""Shared-prefix attention against the approaches users would pick instead.

Approaches (each on the same packed q/k/v, checked against ours before timing):
  naive    every [prefix; completion] its own row, SDPA causal (flash on GPU)
  split    the public prefix-grouper package's scheme: prefix SDPA causal + completion
           SDPA over [prefix K/V repeated G times; own K/V] with bottom-right causal, concat
  flex     PyTorch FlexAttention with a prefix-sharing block mask (compiled; GPU only)
  flashattn flash_attn_varlen_func on the naive rows (GPU, where flash-attn is installed)
  torch / triton   prefix_attention backends of this package

Reports fwd and fwd+bwd median ms, peak extra memory (GPU) and useful TFLOP/s (only the
FLOPs of the shared-prefix pattern; fwd+bwd counted as 3.5x fwd). Writes CSV + PNG under
benchmarks/results/ named after the device.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (RESULTS_DIR, device_name, measure_ms, naive_row_index, shared_prefix_flops,  # noqa: E402
                    slug, versions, matplotlib_pyplot, save_figure, write_csv)

from prefix_grouper import GroupLayout, prefix_attention  # noqa: E402
from prefix_grouper.attention import available_backends  # noqa: E402

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
]
CPU_CONFIGS = [
    ("P512 S64 G8", [512], [[64] * 8], 8, 8, 64),
    ("P256 S128 G4 GQA", [256], [[128] * 4], 8, 2, 64),
]


def run_naive(q, k, v):
    """q/k/v ``[N, H, L, D]``: the naive rows, right-padded (padding is never attended)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run_split(q, k, v, layout):
    """Single-group, equal-length completions only (the scheme needs a rectangular batch)."""
    from torch.nn.attention.bias import causal_lower_right

    p, g = layout.prefix_lens_list[0], layout.group_sizes_list[0]
    s = layout.suffix_lens_list[0]
    hq, hkv = q.shape[1], k.shape[1]
    qp, kp, vp = (x[:p].transpose(0, 1)[None] for x in (q, k, v))
    prefix_out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
    qs = q[p:].reshape(g, s, hq, -1).transpose(1, 2)
    ks = torch.cat([kp.expand(g, -1, -1, -1), k[p:].reshape(g, s, hkv, -1).transpose(1, 2)], 2)
    vs = torch.cat([vp.expand(g, -1, -1, -1), v[p:].reshape(g, s, hkv, -1).transpose(1, 2)], 2)
    suffix_out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(s, p + s),
                                                enable_gqa=True)
    return torch.cat([prefix_out[0].transpose(0, 1), suffix_out.transpose(1, 2).reshape(g * s, hq, -1)])


def make_flex(layout):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    group, segment, pos = layout.token_group, layout.token_segment, layout.position_ids
    is_prefix = layout.token_completion < 0

    def prefix_sharing(b, h, q_idx, kv_idx):
        return ((group[q_idx] == group[kv_idx]) & (pos[kv_idx] <= pos[q_idx])
                & (is_prefix[kv_idx] | (segment[q_idx] == segment[kv_idx])))

    t = layout.total_tokens
    block_mask = create_block_mask(prefix_sharing, None, None, t, t, device=layout.device, _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    return run


def approaches(layout, device, index):
    """``{name: (prepare, run)}``: ``prepare`` turns packed q/k/v into the approach's own
    input layout once (the naive layout's rows are materialized, as a model would hold
    them, outside the timed region); ``run`` is what gets timed."""
    packed = lambda q, k, v: (q, k, v)  # noqa: E731
    found = {"naive": (lambda q, k, v: tuple(x[index].transpose(1, 2).contiguous() for x in (q, k, v)),
                       run_naive)}
    if layout.num_groups == 1 and len(set(layout.suffix_lens_list)) == 1:
        found["split"] = (packed, lambda q, k, v: run_split(q, k, v, layout))
    if device.type == "cuda":
        found["flex"] = (packed, make_flex(layout))
        try:
            from flash_attn import flash_attn_varlen_func

            lengths = (layout.prefix_lens[layout.completion_group] + layout.suffix_lens)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            flat = index[torch.arange(index.shape[1], device=device)[None] < lengths[:, None]]
            max_len = int(lengths.max())
            found["flashattn"] = (lambda q, k, v: (q[flat], k[flat], v[flat]),
                                  lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len,
                                                                         causal=True))
        except ImportError:
            pass
    for backend in available_backends(device):
        if backend != "reference" and not (backend == "triton" and device.type != "cuda"):
            found[backend] = (packed, (lambda b: lambda q, k, v: prefix_attention(q, k, v, layout, backend=b))(backend))
    return found


def completion_view(name, out, layout, index):
    """Completion-token outputs ``[completion tokens, H, D]`` in packed order, for every approach."""
    if name == "naive":
        lengths = layout.prefix_lens[layout.completion_group] + layout.suffix_lens
        cols = torch.arange(index.shape[1], device=out.device)[None]
        keep = (cols >= layout.prefix_lens[layout.completion_group][:, None]) & (cols < lengths[:, None])
        return out.transpose(1, 2)[keep]
    if name == "flashattn":
        lengths = layout.prefix_lens[layout.completion_group] + layout.suffix_lens
        starts = F.pad(lengths.cumsum(0), (1, 0))[:-1]
        rows = torch.repeat_interleave(starts + layout.prefix_lens[layout.completion_group], layout.suffix_lens)
        offsets = torch.arange(layout.num_completion_tokens, device=out.device) - torch.repeat_interleave(
            F.pad(layout.suffix_lens.cumsum(0), (1, 0))[:-1], layout.suffix_lens)
        return out[rows + offsets]
    return out[layout.completion_positions()]


def bench_config(name, prefix, suffix, hq, hkv, d, device, dtype):
    layout = GroupLayout.from_lengths(prefix, suffix, device=device)
    t = layout.total_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(t, h, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    index, _ = naive_row_index(layout)
    flops = shared_prefix_flops(layout, hq, d)
    ours = prefix_attention(q, k, v, layout)[layout.completion_positions()].float()
    # Outputs are O(1) (softmax-weighted averages of unit-normal values): a few ulps of the
    # dtype after rounding, not a mask or position error (which moves them by ~0.1).
    agreement = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    rows = []
    for approach, (prepare, fn) in approaches(layout, device, index).items():
        inputs = prepare(q, k, v)
        err = (completion_view(approach, fn(*inputs), layout, index).float() - ours).abs().max().item()
        leaves = [x.detach().requires_grad_() for x in inputs]
        grad_out = torch.randn_like(fn(*leaves))

        def fwd():
            with torch.no_grad():
                fn(*inputs)

        def fwd_bwd():
            fn(*leaves).backward(grad_out)

        fwd_ms = measure_ms(fwd, device)
        fwd_bwd_ms = measure_ms(fwd_bwd, device)
        peak_gib = float("nan")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        rows.append({
            "config": name, "approach": approach, "device": device_name(device),
            "dtype": str(dtype).replace("torch.", ""), "hq": hq, "hkv": hkv, "d": d,
            "tokens": t, "max_abs_diff_vs_ours": f"{err:.3e}", "agrees": err <= agreement,
            "fwd_ms": f"{fwd_ms:.3f}", "fwd_bwd_ms": f"{fwd_bwd_ms:.3f}",
            "peak_extra_gib": f"{peak_gib:.3f}",
            "useful_tflops_fwd": f"{flops / fwd_ms / 1e9:.2f}",
            "useful_tflops_fwd_bwd": f"{3.5 * flops / fwd_bwd_ms / 1e9:.2f}",
            "versions": versions(),
        })
        if err > agreement:
            print(f"WARNING: {approach} differs from prefix_attention by {err:.2e} on {name}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="*", help="names of configs to run (default: all)")
    parser.add_argument("--out", default=RESULTS_DIR)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    if args.configs:
        configs = [c for c in configs if c[0] in args.configs]
    rows = []
    for config in tqdm(configs, desc="configs"):
        rows.extend(bench_config(*config, device, dtype))
    stem = os.path.join(args.out, f"attention_{slug(device_name(device))}")
    write_csv(rows, stem + ".csv")
    print(f"\n{device_name(device)}; {versions()}; {dtype}")
    print(f"{'config':<22}{'approach':<10}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak GiB':>10}"
          f"{'TF/s fwd':>10}{'TF/s f+b':>10}{'diff':>11}")
    for r in rows:
        print(f"{r['config']:<22}{r['approach']:<10}{r['fwd_ms']:>10}{r['fwd_bwd_ms']:>12}"
              f"{r['peak_extra_gib']:>10}{r['useful_tflops_fwd']:>10}{r['useful_tflops_fwd_bwd']:>10}"
              f"{r['max_abs_diff_vs_ours']:>11}")
    plot(rows, stem + ".png", device)
    print(f"wrote {stem}.csv and {stem}.png")


def plot(rows, path, device):
    plt = matplotlib_pyplot()

    configs = list(dict.fromkeys(r["config"] for r in rows))
    names = list(dict.fromkeys(r["approach"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for i, approach in enumerate(names):
        values = {r["config"]: float(r["fwd_bwd_ms"]) for r in rows if r["approach"] == approach}
        xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(configs)) if configs[c] in values]
        ax.bar(xs, [values[c] for c in configs if c in values], width, label=approach)
    ax.set_xticks(range(len(configs)), configs, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd ms (median, log)")
    ax.set_title(f"shared-prefix attention: {device_name(device)}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
