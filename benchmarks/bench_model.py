"""Whole-model training step: a Qwen2-shaped decoder's completion log-probs, forward + backward.

Approaches, on the same weights and batch (gradient checkpointing on):
  unpacked          every [prompt; completion] its own padded row through the model's sdpa
                    (prefix_grouper.unpacked.unpacked_completion_log_probs)
  flex              one packed row through a FlexAttention prefix-sharing block mask registered
                    as a transformers attention function (the way Unsloth ships it), logits at
                    the completion positions only; needs FlexAttention's backward (CUDA: where
                    it is missing the row says why and is not timed)
  prefix_grouper    one packed row, prefix_grouper.integrations.transformers.completion_log_probs
  prefix_grouper_fused   the same with fused=True (the LM head one chunk of logits at a time)
  prefix_grouper_flash   prefix_grouper with backend="flash" (FlashAttention-2 varlen calls merged
                    by LSE); where flash refuses the model (CPU, float32) the row holds its reason

A step is forward + backward of the summed completion log-probs. Every approach's log-probs
are compared with the unpacked ones before it is timed; one that differs is not timed.
Reports the median step time, tokens per second (the batch's [prompt; completion] row
tokens, the same for every approach, so ratios of it are speedups), peak extra memory, on
CUDA the GPU kernels' time in one profiled step (torch.profiler) and the rest of the median
step, the time outside kernels (host work, launch gaps, syncs; the top kernels are printed),
and the ideal token ratio (unpacked tokens / packed tokens: the speedup if time were linear in
tokens). Models are built from Qwen2Config with random weights (nothing is downloaded):
Qwen2.5-0.5B and 1.5B shapes in bf16 at P4096 S256 G8 on CUDA, a tiny one in fp32 on CPU.

    python -m benchmarks.bench_model                   # this device's configs
    python -m benchmarks.bench_model --quick           # its smallest config

Writes ``model_<device>.csv`` and ``.png`` under ``runs/bench_model/`` (or ``--out`` /
``--update-results``); ``python -m benchmarks.run --suite model`` runs the same.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from typing import Iterator

import torch

from prefix_grouper import GroupLayout
from prefix_grouper.integrations.transformers import completion_log_probs, token_log_probs
from prefix_grouper.unpacked import unpacked_completion_log_probs

from .attention_contenders import flex_for_layout
from .common import (QWEN2_5_0_5B, QWEN2_5_1_5B, add_device_arguments, add_output_arguments, add_size_arguments,
                     bar_chart, flash_refusal, measure_ms, peak_extra_mib, ratios as ratios_of, repeats_of, run_suite,
                     spread, suite_setup, table_lines)

TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=8192)
SMALLER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=4096)
SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
# name, Qwen2Config sizes, prompt lengths, completion lengths per group
GPU_CONFIGS = [  # the 1.5B shape first: it carries the whole-model-step targets
    ("1.5B P4096 S256 G8", QWEN2_5_1_5B, [4096], [[256] * 8]),
    ("0.5B P4096 S256 G8", QWEN2_5_0_5B, [4096], [[256] * 8]),
]
CPU_CONFIGS = [  # smallest first: --quick runs only the first
    ("tiny 2L h128 P512 S64 G4", SMALLER, [512], [[64] * 4]),
    ("tiny 4L h256 ragged 2 groups", TINY, [768, 512], [[48, 64, 33, 64, 20, 64, 64, 7], [64, 64, 50, 1]]),
]
SMOKE_CONFIGS = [("smoke 2L h32 P32 S8 G2", SMOKE, [32], [[8] * 2])]
BASELINES = ("unpacked", "flex")
FLEX_ATTENTION = "prefix_grouper_bench_flex"
FLEX_BLOCK_MASK = "flex_block_mask"
# Log-probs of the same weights, layouts apart: float32 differs by summation order only
# (results/design_measurements.md); bf16 rounds activations to 8 bits in every layer, and a
# 24-28-layer model's log-probs over a 152k vocabulary then move by far more.
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 0.5}


def flex_attention_function(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]`` of
    the packed row, masked by the call's ``flex_block_mask=(block_mask, compiled flex)``;
    returns ``([1, T, Hq, D], None)``."""
    block_mask, flex = kwargs[FLEX_BLOCK_MASK]
    out = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


def flex_model(model):
    """A copy of ``model`` whose attention is :func:`flex_attention_function` (no dense mask built)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FLEX_ATTENTION, flex_attention_function)
    AttentionMaskInterface.register(FLEX_ATTENTION, lambda *args, **kwargs: None)
    copied = copy.deepcopy(model)
    copied.set_attn_implementation(FLEX_ATTENTION)
    return copied


def flex_backward_missing(device: torch.device) -> str | None:
    """FlexAttention's own refusal to differentiate on ``device`` (its message), or None.

    Asked of eager flex_attention on a tiny input: the compiled one raises the same refusal
    wrapped in a Dynamo error, indistinguishable there from a failure to compile."""
    from torch.nn.attention.flex_attention import flex_attention

    probe = torch.zeros(1, 1, 16, 16, device=device, requires_grad=True)
    try:
        flex_attention(probe, probe, probe)
    except NotImplementedError as error:
        return str(error)
    return None


def flex_completion_log_probs(model, layout, prompts, completions, flex):
    """``(log_probs [N, max_S], mask [N, max_S])`` of the packed row through the FlexAttention model."""
    input_ids = layout.pack(prompts, completions)
    logits = model(input_ids=input_ids[None], position_ids=layout.position_ids[None], use_cache=False,
                   logits_to_keep=layout.completion_logit_positions(), **{FLEX_BLOCK_MASK: flex}).logits[0]
    return layout.unpack_completions(token_log_probs(logits, input_ids[layout.completion_positions()]))


def kernel_ms(step, device: torch.device, approach: str) -> float:
    """The GPU kernels' total time in one ``step()`` (torch.profiler, CUDA activity; one
    stream, so their sum is the time the GPU was busy), printing the costliest; nan off CUDA."""
    if device.type != "cuda":
        return math.nan
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    print(f"{approach}: costliest kernels of one step\n"
          + events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70), flush=True)
    busy_us = sum(e.self_device_time_total for e in events)
    # No device events recorded (a profiler without CUDA support) is no measurement, not 0 ms.
    return busy_us / 1e3 if busy_us > 0 else math.nan


def bench_config(name, sizes, prompt_lens, completion_lens, device, dtype, repeats) -> Iterator[dict]:
    """One row per approach on one config, each as soon as measured."""
    import transformers

    config = transformers.Qwen2Config(max_position_embeddings=8192, **sizes)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: a 1.5B model's CPU init alone takes tens of seconds
        model = transformers.Qwen2ForCausalLM(config).to(dtype)
    model.set_attn_implementation("sdpa")
    # The method was renamed in transformers 5.2x.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(config.vocab_size, (p,), generator=gen).to(device) for p in prompt_lens]
    completions = [torch.randint(config.vocab_size, (s,), generator=gen).to(device)
                   for group in completion_lens for s in group]
    layout = GroupLayout.from_lengths(prompt_lens, completion_lens, device=device)
    approaches = {"unpacked": (model, lambda: unpacked_completion_log_probs(model, layout, prompts, completions))}
    flex_missing = flex_backward_missing(device)
    if flex_missing is None:
        flexed, flex = flex_model(model), flex_for_layout(layout)
        approaches["flex"] = (flexed, lambda: flex_completion_log_probs(flexed, layout, prompts, completions, flex))
    approaches.update({
        "prefix_grouper": (model, lambda: completion_log_probs(model, layout, prompts, completions)),
        "prefix_grouper_fused": (model, lambda: completion_log_probs(model, layout, prompts, completions,
                                                                     fused=True)),
    })
    # The head dim as Qwen2Attention reads it; Qwen2 has no attention softcap.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    flash_refused = flash_refusal(device, dtype, head_dim)
    if flash_refused is None:
        approaches["prefix_grouper_flash"] = (model, lambda: completion_log_probs(model, layout, prompts, completions,
                                                                                  backend="flash"))
    unpacked_tokens, packed_tokens = layout.unpacked_tokens(), layout.total_tokens
    completion_tokens = sum(len(c) for c in completions)

    def row(approach, diff=math.nan, grad_diff=math.nan, ms=math.nan, mib=math.nan, busy_ms=math.nan, note=""):
        if note:
            print(f"{name}, {approach}: {note}", flush=True)
        return {
            "config": name, "approach": approach, "dtype": str(dtype).removeprefix("torch."),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
            "unpacked_tokens": unpacked_tokens, "packed_tokens": packed_tokens,
            "completion_tokens": completion_tokens, "ideal_token_ratio": f"{unpacked_tokens / packed_tokens:.2f}",
            "max_abs_logprob_diff_vs_unpacked": f"{diff:.2e}", "logprob_tolerance": f"{TOLERANCES[dtype]:.0e}",
            "max_rel_grad_diff_vs_unpacked": f"{grad_diff:.2e}", "step_ms": f"{ms:.1f}", **spread("step_ms", ms, 1),
            "tokens_per_s": f"{unpacked_tokens / ms * 1e3:.0f}", "peak_extra_mib": f"{mib:.0f}",
            "kernel_ms": f"{busy_ms:.1f}", "outside_kernels_ms": f"{ms - busy_ms:.1f}", "note": note,
        }

    if flex_missing is not None:
        yield row("flex", note=f"not run: FlexAttention has no backward here ({flex_missing})")
    if flash_refused is not None:
        yield row("prefix_grouper_flash", note=f"not run: {flash_refused}")
    reference = reference_grads = None
    for approach, (owner, log_probs) in approaches.items():
        def step():
            owner.zero_grad(set_to_none=True)
            values, mask = log_probs()
            (values * mask).sum().backward()  # no boolean indexing: it would synchronize
            return values.detach(), mask

        values, mask = step()
        grads = [p.grad.detach().clone() for p in owner.parameters()]
        if reference is None:
            reference, reference_grads = values, grads
        diff = (values - reference)[mask].abs().max().item()
        # Relative to each parameter's largest unpacked gradient entry: parameters' gradients
        # differ in scale by orders of magnitude.
        grad_diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                        for a, b in zip(grads, reference_grads))
        if diff > TOLERANCES[dtype]:
            yield row(approach, diff, grad_diff, note=f"not timed: log-probs differ from unpacked by {diff:.2e} > "
                                                      f"{TOLERANCES[dtype]:.0e}")
        else:
            yield row(approach, diff, grad_diff, measure_ms(step, device, *repeats, whole_steps=True),
                      peak_extra_mib(step, device), kernel_ms(step, device, approach))
        del grads
        owner.zero_grad(set_to_none=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    add_size_arguments(parser)
    add_output_arguments(parser, "bench_model")
    return parser


def run(args) -> Iterator[dict]:
    """One row per config and approach for :func:`build_parser`'s options, each as soon as measured."""
    device, dtype, configs = suite_setup(args, gpu=GPU_CONFIGS, cpu=CPU_CONFIGS, smoke=SMOKE_CONFIGS)
    for config in configs:
        yield from bench_config(*config, device, dtype, repeats_of(args))


def summary(rows) -> list[str]:
    lines = table_lines(rows, [
        ("config", -30, "config"), ("approach", -22, "approach"), ("step ms", 10, "step_ms"),
        ("tokens/s", 10, "tokens_per_s"), ("peak MiB", 10, "peak_extra_mib"),
        ("kernels ms", 11, "kernel_ms"), ("outside ms", 11, "outside_kernels_ms"),
        ("ideal", 7, lambda r: f"{r['ideal_token_ratio']}x"), ("logp diff", 11, "max_abs_logprob_diff_vs_unpacked"),
        ("grad diff", 11, "max_rel_grad_diff_vs_unpacked"), ("  note", -6, lambda r: f"  {r['note']}")])
    return lines


def ratios(rows) -> list[dict]:
    return ratios_of(rows, config="config", approach="approach", metric="step_ms", baselines=BASELINES)


def plot(rows, path, where):
    series = {}
    for r in rows:
        if r["step_ms"] != "nan":
            series.setdefault(r["approach"], {})[r["config"]] = float(r["step_ms"])
    bar_chart(series, path, ylabel="ms per step (median)",
              title=f"model step (completion log-probs fwd+bwd, grad ckpt): {where}")


def main():
    run_suite("model", sys.modules[__name__], build_parser().parse_args())


if __name__ == "__main__":
    main()
