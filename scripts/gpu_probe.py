"""GPU correctness probe of the Triton and flash attention backends (bf16), run by
scripts/gpu_check.sh.

For random ragged GQA layouts and random prefix trees (``GroupLayout.from_sequences``), with
and without a sliding window, a logit softcap and attention sinks, it compares each backend's
bf16 outputs and gradients (q, k, v, sinks) with the float64 reference, against PyTorch's own
bf16 error: eager attention (bf16 matmuls, float32 softmax, as transformers' eager path
computes) on the same inputs. The pass bound is error(backend) <= 2 x error(PyTorch bf16) +
1e-3 (the additive floor keeps near-zero eager errors, e.g. of a one-token row, from making
the bound vacuous-tight). A case flash refuses (a softcap on PyTorch's FlashAttention-2
engine) prints flash's reason and counts no failure. It also checks bitwise repeatability of
two identical calls (for flash recorded, and required only under
torch.use_deterministic_algorithms(True): see check_backend), that flash's fused LSE-merge
kernel (csrc/flash_merge.cpp) was built and runs, that forward and backward never synchronize
with the host (torch.cuda.set_sync_debug_mode("error")), and lists where a whole model step
(``completion_log_probs`` forward + backward on a 2-layer Qwen2 with the 1.5B model's heads,
gradient checkpointing on) synchronizes: a sync in this package's code fails (the fused
path's one documented read of the targets' range excepted), one in transformers or torch is
reported. Prints one line per case and exits 1 on any failure.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections import Counter

import torch

import prefix_grouper
from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.attention.reference import prefix_sharing_mask

PACKAGE_DIR = os.path.dirname(os.path.abspath(prefix_grouper.__file__))
BACKENDS = ("triton", "flash")
# The fused head's one sync: check_targets reads (min, max) of the targets back (documented there).
ALLOWED_SYNC_FILES = {"fused": {os.path.join(PACKAGE_DIR, "logprobs", "api.py")}, "plain": set()}


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


def check_case(label, layout, heads, features, gen, device, backends=BACKENDS, dtype=torch.bfloat16) -> int:
    """Print one case's errors (each of ``backends`` in ``dtype`` against the fp64 reference,
    beside eager attention in ``dtype``), one line per backend; return its number of failures."""
    hq, hkv, d = heads
    t = layout.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=gen).to(device) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, generator=gen).to(device) if features.get("sinks") else None
    window, softcap = features.get("window"), features.get("softcap")
    grad_out = torch.randn(t, hq, d, generator=gen).to(device)
    inputs64 = [x.double() for x in (q, k, v)] + [None if sinks is None else sinks.double()]
    inputs_low = [x.to(dtype) for x in (q, k, v)] + [sinks]

    def ours(backend):
        return lambda q, k, v, s=None: prefix_attention(q, k, v, layout, sinks=s, backend=backend, window=window,
                                                        softcap=softcap)

    truth = outputs_and_grads(ours("reference"), inputs64, grad_out.double())
    eager = outputs_and_grads(lambda q, k, v, s=None: eager_attention(q, k, v, layout, window, softcap, s),
                              inputs_low, grad_out)
    where = f"{label} T={t} Hq/Hkv={hq}/{hkv} D={d} {features or 'plain'}"
    return sum(check_backend(where, backend, ours(backend), inputs_low, grad_out, truth, eager, dtype)
               for backend in backends)


def check_backend(where, backend, run, inputs, grad_out, truth, eager, dtype) -> int:
    """Print ``backend``'s errors against ``truth`` beside ``eager``'s and whether two identical
    calls agree bitwise; return its number of failures (0 where flash refuses the case)."""
    try:
        measured = outputs_and_grads(run, inputs, grad_out)
    except ValueError as refusal:  # flash's refusal of a feature or dtype (BackendUnavailableError is one too)
        if backend != "flash":
            raise
        print(f"{where}: {backend} not run: {refusal}", flush=True)
        return 0
    names = ["out", "dq", "dk", "dv", "dsinks"][:len(truth)]
    failures, worst = 0, []
    for name, a, b, e in zip(names, measured, truth, eager):
        ours_err, eager_err = rel_err(a, b), rel_err(e, b)
        ok = ours_err <= 2 * eager_err + 1e-3
        failures += not ok
        worst.append(f"{name} {ours_err:.2e}/{eager_err:.2e}{'' if ok else ' FAIL'}")
    again = outputs_and_grads(run, inputs, grad_out)
    repeatable = all(torch.equal(a, b) for a, b in zip(measured, again))
    # FlashAttention-2's backward adds dQ up with atomics in whatever order the blocks finish, so
    # two flash calls may differ in dq's last bits; both engines accumulate deterministically only
    # under torch.use_deterministic_algorithms(True) (not warn_only), the one mode where flash
    # must repeat.
    required = backend != "flash" or (torch.are_deterministic_algorithms_enabled()
                                      and not torch.is_deterministic_algorithms_warn_only_enabled())
    failures += required and not repeatable
    print(f"{where}: rel err {backend}/eager {dtype}: " + ", ".join(worst)
          + f"; bitwise repeatable: {repeatable}{'' if required else ' (not required: nondeterministic mode)'}",
          flush=True)
    return failures


def merge_kernel_missing(device) -> str | None:
    """Why flash's fused LSE-merge kernel cannot run on ``device`` (None: it ran). Flash falls
    back to a PyTorch merge without a word where the extension lacks it, so every other check
    would pass on a build that lost it."""
    from prefix_grouper.attention.flash_merge import merge_partials

    out = torch.zeros(2, 1, 8, device=device, dtype=torch.bfloat16)
    try:
        merge_partials([(0, out, torch.zeros(1, 2, device=device))], 2, implementation="cuda")
    except RuntimeError as reason:
        return str(reason)
    return None


def sync_sites(run) -> Counter:
    """``Counter`` of ``"file:line"`` where ``run()`` made CUDA synchronize with the host
    (torch.cuda.set_sync_debug_mode("warn")'s warnings, attributed to the Python line that
    called the op)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def unexpected_sync_sites(sites: Counter, allowed_files: set[str]) -> Counter:
    """The sites inside this package outside ``allowed_files`` (transformers' and torch's are
    reported, not failures: this package cannot change them)."""
    return Counter({site: n for site, n in sites.items()
                    if site.startswith(PACKAGE_DIR + os.sep) and site.rsplit(":", 1)[0] not in allowed_files})


def model_steps(device, dtype=torch.bfloat16) -> dict:
    """``{"plain": step, "fused": step}``: forward + backward of the summed completion log-probs
    of a 2-layer Qwen2 with the 1.5B model's attention heads (12/2, head dim 128), gradient
    checkpointing on, LM head applied plainly or by ``fused_linear_log_probs``."""
    import transformers

    from prefix_grouper.integrations.transformers import completion_log_probs

    config = transformers.Qwen2Config(hidden_size=1536, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=12, num_key_value_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(device, dtype)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    layout = GroupLayout.from_lengths([300, 41], [[64, 7, 0], [33]], device=device)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1024, (n,), generator=gen).to(device) for n in layout.prefix_lens_list]
    completions = [torch.randint(1024, (n,), generator=gen).to(device)
                   for group in layout.suffix_lens_per_group for n in group]

    def step(fused):
        values, mask = completion_log_probs(model, layout, prompts, completions, fused=fused)
        (values * mask).sum().backward()

    return {"plain": lambda: step(False), "fused": lambda: step(True)}


def check_model_step_syncs(device) -> int:
    """Print where a model step syncs, plain and fused head; return the number of failures."""
    failures = 0
    for head, step in model_steps(device).items():
        step()  # warm: compiles, autotuning, per-layout caches
        torch.cuda.synchronize()
        sites = sync_sites(step)
        ours = unexpected_sync_sites(sites, ALLOWED_SYNC_FILES[head])
        failures += bool(ours)
        listed = ", ".join(f"{os.path.relpath(site)} x{n}" for site, n in sites.most_common()) or "none"
        print(f"host syncs in a model step ({head} head): {sum(sites.values())} ({listed}): "
              f"{'FAIL' if ours else 'PASS'}", flush=True)
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_probe: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    missing = merge_kernel_missing(device)
    failures = int(missing is not None)
    print(f"flash merge kernel: {'FAIL ' + missing if missing else 'PASS (the CUDA op ran)'}", flush=True)
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
    # Flash's window and sinks without a softcap, which PyTorch's FlashAttention-2 engine refuses.
    sync_features = {"triton": (dict(), dict(window=128, softcap=20.0, sinks=sinks)),
                     "flash": (dict(), dict(window=128, sinks=sinks))}
    for backend in BACKENDS:
        for features in sync_features[backend]:
            what = f"{backend}, {', '.join(features) or 'plain'}"
            prefix_attention(q, k, v, layout, backend=backend, **features).sum().backward()  # warm: autotuning may sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                prefix_attention(q, k, v, layout, backend=backend, **features).sum().backward()
                print(f"no host sync in forward+backward ({what}): PASS", flush=True)
            except RuntimeError as error:
                failures += 1
                print(f"host sync in forward+backward ({what}): FAIL {error}", flush=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    failures += check_model_step_syncs(device)
    print("gpu_probe:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
