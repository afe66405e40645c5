"""Whole-model check and timing: completion log-probs, unpacked rows vs the packed layout."""
from __future__ import annotations

import copy
import os

import torch

from prefix_grouper import GroupLayout
from prefix_grouper.integrations.transformers import completion_log_probs
from prefix_grouper.unpacked import unpacked_completion_log_probs

from .common import device_name, measure_ms, report_equivalence, slug, versions, write_csv


def model_config(device):
    import transformers

    if device.type == "cuda":  # Qwen2.5-0.5B's shape
        shape = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2)
        batch = ([4096], [[256] * 8])
    else:
        shape = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2)
        batch = ([768, 512], [[48, 64, 33, 64, 20, 64, 64, 7], [64, 64, 50, 1]])
    return transformers.Qwen2Config(max_position_embeddings=8192, **shape), batch


def model_demo(device, out_dir):
    import transformers

    config, (prompt_lens, completion_lens) = model_config(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unpacked = transformers.Qwen2ForCausalLM(config).to(device, dtype)
    unpacked.set_attn_implementation("sdpa")
    # Its own config: completion_log_probs installs prefix_grouper's attention into it.
    packed = transformers.Qwen2ForCausalLM(copy.deepcopy(config)).to(device, dtype)
    packed.load_state_dict(unpacked.state_dict())
    packed.set_attn_implementation("sdpa")
    for model in (unpacked, packed):  # the method was renamed in transformers 5.2x
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(config.vocab_size, (p,), generator=gen).to(device) for p in prompt_lens]
    completions = [torch.randint(config.vocab_size, (s,), generator=gen).to(device)
                   for group in completion_lens for s in group]
    layout = GroupLayout.from_lengths(prompt_lens, completion_lens, device=device)

    def run_unpacked():
        logp, valid = unpacked_completion_log_probs(unpacked, layout, prompts, completions)
        (logp * valid).sum().backward()
        return logp, valid

    def run_packed():
        logp, valid = completion_log_probs(packed, layout, prompts, completions)
        (logp * valid).sum().backward()
        return logp, valid

    logp_unpacked, valid = run_unpacked()
    logp_packed, _ = run_packed()
    max_err = (logp_unpacked - logp_packed)[valid].abs().max().item()
    # float32: measured 9.5e-7 (summation order only); bf16 log-probs over a 152k vocabulary
    # round to ~0.1 after 24 layers.
    tolerance = 1e-3 if dtype == torch.float32 else 0.5
    report_equivalence(f"whole model, {config.num_hidden_layers} layers, completion log-probs", max_err,
                       tolerance, str(dtype).replace("torch.", ""))
    grad_err = max((a.grad.float() - b.grad.float()).abs().max().item() / max(a.grad.abs().max().item(), 1e-30)
                   for a, b in zip(unpacked.parameters(), packed.parameters()) if a.grad is not None)
    times = {}
    for name, fn in [("unpacked", run_unpacked), ("packed", run_packed)]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times[name] = measure_ms(fn, device, warmup=1, repeats=3)
        times[name + "_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                                else float("nan"))
    row = {
        "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "model": f"Qwen2 {config.num_hidden_layers}L h{config.hidden_size} vocab {config.vocab_size}",
        "prompts": prompt_lens, "completions": completion_lens,
        "unpacked_tokens": layout.unpacked_tokens(), "packed_tokens": layout.total_tokens,
        "max_logprob_diff": f"{max_err:.2e}", "max_rel_grad_diff": f"{grad_err:.2e}",
        "unpacked_fwd_bwd_ms": f"{times['unpacked']:.1f}", "packed_fwd_bwd_ms": f"{times['packed']:.1f}",
        "unpacked_peak_gib": f"{times['unpacked_gib']:.2f}", "packed_peak_gib": f"{times['packed_gib']:.2f}",
        "speedup": f"{times['unpacked'] / times['packed']:.2f}",
        "versions": versions(),
    }
    path = os.path.join(out_dir, f"demo_model_{slug(device_name(device))}.csv")
    write_csv([row], path)
    print(f"\nwhole model ({row['model']}, {row['dtype']}, gradient checkpointing) on {row['device']}; {versions()}")
    print(f"tokens unpacked {row['unpacked_tokens']} -> packed {row['packed_tokens']}; parameter gradients "
          f"differ by at most {row['max_rel_grad_diff']} (relative)")
    print(f"fwd+bwd of the summed completion log-probs: unpacked {row['unpacked_fwd_bwd_ms']} ms, "
          f"packed {row['packed_fwd_bwd_ms']} ms -> {row['speedup']}x; wrote {path}")
