"""GPU correctness probe of the Triton attention (bf16), run by scripts/gpu_check.sh.

For random ragged GQA layouts and random prefix trees (``GroupLayout.from_sequences``), with
and without a sliding window, a logit softcap and attention sinks, it compares the Triton
backend's bf16 outputs and gradients (q, k, v, sinks) with the float64 reference, against
PyTorch's own bf16 error: eager attention (bf16 matmuls, float32 softmax, as transformers'
eager path computes) on the same inputs. The pass bound is
error(Triton) <= 2 x error(PyTorch bf16) + 1e-3 (the additive floor keeps near-zero eager
errors, e.g. of a one-token row, from making the bound vacuous-tight). It also checks bitwise
repeatability of two identical calls and that forward and backward never synchronize with
the host (torch.cuda.set_sync_debug_mode("error")). Prints one line per case and exits 1 on
any failure.
"""
from __future__ import annotations

import sys

import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention.reference import prefix_sharing_mask


def eager_attention(q, k, v, layout, window, softcap, sinks):
    """transformers-style eager attention: matmuls in the inputs' dtype (bf16 here), float32
    softmax, output in the inputs' dtype."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float().masked_fill(~prefix_sharing_mask(layout, window), float("-inf"))
    if sinks is not None:
        column = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)
        probs = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("hts,shd->thd", probs.to(v.dtype), v)


def randint(gen, low, high):
    return int(torch.randint(low, high, (1,), generator=gen))


def random_layout(gen, device):
    groups = randint(gen, 1, 4)
    prefix = [randint(gen, 1, 300) for _ in range(groups)]
    suffix = [[randint(gen, 0, 97) for _ in range(randint(gen, 1, 5))] for _ in range(groups)]
    return GroupLayout.from_lengths(prefix, suffix, device=device)


def random_tree(gen, device):
    """A depth-3 tree: a shared prompt, 1-3 shared middles, 1-3 leaves under each."""
    def tokens(low, high):
        return torch.randint(0, 50_000, (randint(gen, low, high),), generator=gen).tolist()

    prompt = tokens(1, 300)
    sequences = []
    for _ in range(randint(gen, 1, 4)):
        middle = prompt + tokens(1, 60)
        sequences += [middle + tokens(0, 97) for _ in range(randint(gen, 1, 4))]
    return GroupLayout.from_sequences(sequences, device=device)


def outputs_and_grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().double()] + [x.grad.double() for x in leaves if x is not None]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(label, layout, heads, features, gen, device, backend="triton", dtype=torch.bfloat16) -> int:
    """Print one case's errors (``backend`` in ``dtype`` against the fp64 reference, beside
    eager attention in ``dtype``); return its number of failures."""
    hq, hkv, d = heads
    t = layout.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=gen).to(device) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, generator=gen).to(device) if features.get("sinks") else None
    window, softcap = features.get("window"), features.get("softcap")
    grad_out = torch.randn(t, hq, d, generator=gen).to(device)
    inputs64 = [x.double() for x in (q, k, v)] + [None if sinks is None else sinks.double()]
    inputs_low = [x.to(dtype) for x in (q, k, v)] + [sinks]

    def ours(q, k, v, s, backend):
        return prefix_attention(q, k, v, layout, sinks=s, backend=backend, window=window, softcap=softcap)

    truth = outputs_and_grads(lambda q, k, v, s=None: ours(q, k, v, s, "reference"), inputs64, grad_out.double())
    measured = outputs_and_grads(lambda q, k, v, s=None: ours(q, k, v, s, backend), inputs_low, grad_out)
    eager = outputs_and_grads(lambda q, k, v, s=None: eager_attention(q, k, v, layout, window, softcap, s),
                              inputs_low, grad_out)
    names = ["out", "dq", "dk", "dv", "dsinks"][:len(truth)]
    failures, worst = 0, []
    for name, a, b, e in zip(names, measured, truth, eager):
        ours_err, eager_err = rel_err(a, b), rel_err(e, b)
        ok = ours_err <= 2 * eager_err + 1e-3
        failures += not ok
        worst.append(f"{name} {ours_err:.2e}/{eager_err:.2e}{'' if ok else ' FAIL'}")
    again = outputs_and_grads(lambda q, k, v, s=None: ours(q, k, v, s, backend), inputs_low, grad_out)
    repeatable = all(torch.equal(a, b) for a, b in zip(measured, again))
    failures += not repeatable
    print(f"{label} T={t} Hq/Hkv={hq}/{hkv} D={d} {features or 'plain'}: rel err {backend}/eager {dtype}: "
          + ", ".join(worst) + f"; bitwise repeatable: {repeatable}", flush=True)
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_probe: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    failures = 0
    cases = [dict(), dict(window=64), dict(softcap=5.0), dict(sinks=True), dict(window=17, softcap=3.0, sinks=True)]
    for index, features in enumerate(cases * 2):
        heads = (12, 2, 128) if index % 2 == 0 else (14, 2, 64)
        failures += check_case(f"case {index}", random_layout(gen, device), heads, features, gen, device)
    for index, features in enumerate([dict(), dict(window=40, softcap=3.0, sinks=True)] * 2):
        failures += check_case(f"tree {index}", random_tree(gen, device), (12, 2, 128), features, gen, device)

    layout = GroupLayout.from_lengths([1000, 37], [[200] * 8, [5, 0, 90]], device=device)
    q = torch.randn(layout.total_tokens, 8, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(layout.total_tokens, 2, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    sinks = torch.randn(8, device=device, requires_grad=True)
    for features in (dict(), dict(window=128, softcap=20.0, sinks=sinks)):
        prefix_attention(q, k, v, layout, **features).sum().backward()  # warm: autotune may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            prefix_attention(q, k, v, layout, **features).sum().backward()
            print(f"no host sync in forward+backward ({'features' if features else 'plain'}): PASS", flush=True)
        except RuntimeError as error:
            failures += 1
            print(f"host sync in forward+backward ({'features' if features else 'plain'}): FAIL {error}", flush=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print("gpu_probe:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
