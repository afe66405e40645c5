"""Demo: the packed shared-prefix layout equals the naive layout, and is faster.

1. Attention alone: builds ragged GRPO batches, runs ``prefix_attention`` (backend
   "auto") on the packed layout and causal SDPA on the naive layout (every
   ``[prefix; completion]`` its own padded row), checks in float64 that completion outputs
   and q/k/v gradients agree, then times both (forward and forward+backward).
2. A whole model: a randomly initialized Qwen2-shaped transformers model computes the
   completion log-probs of a GRPO batch, naive (padded rows through SDPA) and packed
   (``attn_implementation="prefix_grouper"``); checks they agree and times forward+backward.

Writes CSVs and PNGs under benchmarks/results/.
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
from prefix_grouper.attention.api import _resolve_backend  # noqa: E402
from model_demo import model_demo  # noqa: E402


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


def naive_attention(qn, kn, vn, lengths):
    """Causal SDPA over padded naive rows ``[N, L, H, D]``; right padding is never seen."""
    out = F.scaled_dot_product_attention(qn.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def check_equivalence(layout, q, k, v, backend):
    """Max |grouped - naive| over completion outputs and the q/k/v gradients, with the
    grouped side on the ``backend`` that gets timed (float64 where it supports it, else
    float32) and the naive side in float64. Exits if they disagree."""
    precision = torch.float64 if backend in ("torch", "reference") else torch.float32
    tolerance = 1e-9 if precision == torch.float64 else 1e-3
    index, lengths = naive_row_index(layout)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    grouped_leaves = [x.detach().to(precision).requires_grad_() for x in (q, k, v)]
    grouped = prefix_attention(*grouped_leaves, layout, backend=backend)
    naive = naive_attention(*(x[index] for x in leaves), lengths)
    # Completion token j, column c of naive row r <-> packed completion position.
    prefix_len = layout.prefix_lens[layout.completion_group]
    cols = torch.arange(index.shape[1], device=index.device)[None]
    is_completion = (cols >= prefix_len[:, None]) & (cols < lengths[:, None])
    weight = torch.randn(grouped.shape, dtype=torch.float64, device=grouped.device)
    loss_naive = (naive * weight[index])[is_completion].sum()
    completion_tokens = layout.token_completion >= 0
    loss_grouped = (grouped * weight.to(precision))[completion_tokens].sum()
    out_err = (naive[is_completion] - grouped[index[is_completion]].double()).abs().max().item()
    grad_naive = torch.autograd.grad(loss_naive, leaves)
    grad_grouped = torch.autograd.grad(loss_grouped, grouped_leaves)
    grad_err = max((a - b.double()).abs().max().item() for a, b in zip(grad_naive, grad_grouped))
    if max(out_err, grad_err) > tolerance:
        raise SystemExit(f"prefix_attention (backend={backend}) disagrees with the naive layout: "
                         f"output error {out_err:.2e}, gradient error {grad_err:.2e} > {tolerance:.0e}")
    return out_err, grad_err, str(precision).replace("torch.", "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--skip-model", action="store_true", help="skip the whole-model part")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rows = []
    for name, prefix, suffix, hq, hkv, d in tqdm(batches(device), desc="batches"):
        layout = GroupLayout.from_lengths(prefix, suffix, device=device)
        q = torch.randn(layout.total_tokens, hq, d, device=device, dtype=dtype)
        k = torch.randn(layout.total_tokens, hkv, d, device=device, dtype=dtype)
        v = torch.randn(layout.total_tokens, hkv, d, device=device, dtype=dtype)
        backend = _resolve_backend("auto", device, dtype)
        out_err, grad_err, checked_in = check_equivalence(layout, q, k, v, backend)

        index, lengths = naive_row_index(layout)
        qn, kn, vn = (x[index].detach().requires_grad_() for x in (q, k, v))
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        grad_out_naive = torch.randn_like(qn)
        grad_out_grouped = torch.randn_like(qg)

        def naive_fwd():
            with torch.no_grad():
                naive_attention(qn, kn, vn, lengths)

        def grouped_fwd():
            with torch.no_grad():
                prefix_attention(qg, kg, vg, layout)

        def naive_fwd_bwd():
            naive_attention(qn, kn, vn, lengths).backward(grad_out_naive)

        def grouped_fwd_bwd():
            prefix_attention(qg, kg, vg, layout).backward(grad_out_grouped)

        times = {label: measure_ms(fn, device) for label, fn in
                 [("naive_fwd", naive_fwd), ("grouped_fwd", grouped_fwd),
                  ("naive_fwd_bwd", naive_fwd_bwd), ("grouped_fwd_bwd", grouped_fwd_bwd)]}
        flops = shared_prefix_flops(layout, hq, d)
        rows.append({
            "batch": name, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "backend": backend, "packed_tokens": layout.total_tokens, "naive_tokens": layout.naive_tokens(),
            "checked_in": checked_in, "max_out_err": f"{out_err:.2e}", "max_grad_err": f"{grad_err:.2e}",
            **{f"{key}_ms": f"{value:.3f}" for key, value in times.items()},
            "speedup_fwd": f"{times['naive_fwd'] / times['grouped_fwd']:.2f}",
            "speedup_fwd_bwd": f"{times['naive_fwd_bwd'] / times['grouped_fwd_bwd']:.2f}",
            "useful_tflops_fwd_bwd": f"{3.5 * flops / times['grouped_fwd_bwd'] / 1e9:.3f}",
            "versions": versions(),
        })
    write_results(rows, device, args.out)
    if not args.skip_model:
        model_demo(device, args.out)


def write_results(rows, device, out_dir):
    stem = os.path.join(out_dir, f"demo_{slug(device_name(device))}")
    write_csv(rows, stem + ".csv")
    print(f"\n{device_name(device)}; {versions()}")
    header = f"{'batch':<16}{'backend':<9}{'tokens naive->packed':>22}{'out err':>10}{'grad err':>10}" \
             f"{'fwd ms naive/grouped':>24}{'fwd+bwd ms naive/grouped':>28}{'speedup':>9}"
    print(header)
    for r in rows:
        print(f"{r['batch']:<16}{r['backend']:<9}{str(r['naive_tokens']) + ' -> ' + str(r['packed_tokens']):>22}"
              f"{r['max_out_err']:>10}{r['max_grad_err']:>10}"
              f"{r['naive_fwd_ms'] + ' / ' + r['grouped_fwd_ms']:>24}"
              f"{r['naive_fwd_bwd_ms'] + ' / ' + r['grouped_fwd_bwd_ms']:>28}{r['speedup_fwd_bwd'] + 'x':>9}")
    plot(rows, stem + ".png", device)
    print(f"wrote {stem}.csv and {stem}.png")


def plot(rows, path, device):
    plt = matplotlib_pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    width = 0.2
    series = [("naive_fwd_ms", "naive fwd"), ("grouped_fwd_ms", "grouped fwd"),
              ("naive_fwd_bwd_ms", "naive fwd+bwd"), ("grouped_fwd_bwd_ms", "grouped fwd+bwd")]
    for i, (key, label) in enumerate(series):
        ax.bar([xi + (i - 1.5) * width for xi in x], [float(r[key]) for r in rows], width, label=label)
    ax.set_xticks(list(x), [r["batch"] for r in rows])
    ax.set_ylabel("ms (median)")
    ax.set_title(f"prefix_attention vs naive layout: {device_name(device)}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
