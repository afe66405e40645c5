"""Whole-model check and timing: completion log-probs, unpacked rows vs the packed layout."""
from __future__ import annotations

import copy
import os

import torch
from prefix_grouper import GroupLayout
from prefix_grouper.integrations.transformers import ATTENTION_NAME, completion_log_probs, register

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


def unpacked_log_probs(model, prompts, completions, group_of):
    """Padded ``[prompt; completion]`` rows (right padding) -> completion log-probs ``[N, max_S]``."""
    rows = [torch.cat([prompts[b], c]) for b, c in zip(group_of, completions)]
    width, device = max(len(r) for r in rows), rows[0].device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = r
        mask[j, :len(r)] = 1
    prompt_lens = torch.tensor([len(prompts[b]) for b in group_of], device=device)
    max_s = max(len(c) for c in completions)
    cols = prompt_lens[:, None] - 1 + torch.arange(max_s, device=device)[None]
    valid = torch.arange(max_s, device=device)[None] < torch.tensor([len(c) for c in completions],
                                                                     device=device)[:, None]
    cols = torch.where(valid, cols, torch.zeros_like(cols))
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    hidden = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.lm_head(hidden).float()
    targets = ids.gather(1, (cols + 1).clamp(max=width - 1))
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * valid, valid


def model_demo(device, out_dir):
    import transformers

    register()
    config, (prompt_lens, completion_lens) = model_config(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unpacked = transformers.Qwen2ForCausalLM(config).to(device, dtype)
    unpacked.set_attn_implementation("sdpa")
    packed = transformers.Qwen2ForCausalLM(copy.deepcopy(config)).to(device, dtype)  # own attn setting
    packed.load_state_dict(unpacked.state_dict())
    packed.set_attn_implementation(ATTENTION_NAME)
    for model in (unpacked, packed):  # the method was renamed in transformers 5.2x
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(config.vocab_size, (p,), generator=gen).to(device) for p in prompt_lens]
    completions = [torch.randint(config.vocab_size, (s,), generator=gen).to(device)
                   for group in completion_lens for s in group]
    group_of = [b for b, group in enumerate(completion_lens) for _ in group]
    layout = GroupLayout.from_lengths(prompt_lens, completion_lens, device=device)

    def run_unpacked():
        logp, valid = unpacked_log_probs(unpacked, prompts, completions, group_of)
        logp.sum().backward()
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
        "unpacked_tokens": layout.naive_tokens(), "packed_tokens": layout.total_tokens,
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
