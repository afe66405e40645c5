"""TRL GRPO training-step time: trl.GRPOTrainer against prefix_grouper's drop-in GRPOTrainer.

A step here is what the drop-in changes: one no-grad forward for the old policy (TRL runs
the same forward for the reference model when ``beta > 0``) and the loss forward and
backward, under gradient checkpointing (GRPOConfig's default), on a fixed TRL-shaped
micro-batch: B groups of G completions of ragged lengths, long prompts, rows shuffled as
TRL shuffles them. Generation and rewards, identical in both, are left out. Configs named
"system" open every prompt with one common system prompt: the drop-in shares it across groups
(a prefix tree), and is timed a third time with ``share_across_groups = False`` (one level,
each group's prompt on its own); packed tokens are reported for both.

Models are built from a Qwen2Config with random weights (nothing is downloaded): a tiny one
on CPU, Qwen2.5-0.5B and 1.5B shapes (bfloat16) on CUDA.

    python -m benchmarks.bench_trl                      # this device's configs
    python -m benchmarks.bench_trl --configs "tiny P1024 S64 G8 x2" --threads 1

Writes ``trl_<device>.csv`` and ``.png`` under ``runs/bench_trl/`` (or ``--out`` /
``--update-results``); ``python -m benchmarks.run --suite trl`` runs the same.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings

import torch

from .common import (QWEN2_5_0_5B, QWEN2_5_1_5B, add_device_arguments, add_output_arguments, add_size_arguments,
                     bar_chart, measure_ms, repeats_of, run_suite, spread, suite_setup)

# name, Qwen2Config sizes, prompt length, max completion length, group size, groups per micro-batch
# [, system prompt length: the leading tokens every group's prompt shares]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)
CPU_CONFIGS = [  # smallest first: --quick runs only the first
    ("tiny P512 S64 G8 x2", TINY, 512, 64, 8, 2),
    ("tiny P1024 S64 G8 x2", TINY, 1024, 64, 8, 2),
    ("tiny system 768 P1024 S64 G8 x4", TINY, 1024, 64, 8, 4, 768),
]
GPU_CONFIGS = [
    ("0.5B P2048 S256 G8 x2", QWEN2_5_0_5B, 2048, 256, 8, 2),
    ("0.5B P4096 S512 G8 x2", QWEN2_5_0_5B, 4096, 512, 8, 2),
    ("1.5B P2048 S256 G8 x2", QWEN2_5_1_5B, 2048, 256, 8, 2),
    ("1.5B P4096 S512 G8 x1", QWEN2_5_1_5B, 4096, 512, 8, 1),
    ("0.5B system 2048 P3072 S256 G8 x4", QWEN2_5_0_5B, 3072, 256, 8, 4, 2048),
]
SMOKE_CONFIGS = [("smoke tiny P32 S8 G2 x1", TINY, 32, 8, 2, 1),
                 ("smoke tiny system 40 P48 S8 G2 x2", TINY, 48, 8, 2, 2, 40)]
PAD, EOS = 0, 1


def word_tokenizer():
    """An offline word-level tokenizer (the timed step never tokenizes; TRL wants one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def micro_batch(vocab_size, prompt_len, completion_len, group_size, num_groups, device, system_len=0):
    """TRL's rows: left-padded prompts (group b's prompt is ``b`` tokens shorter than the
    longest; all open with the same ``system_len`` tokens), right-padded completions of
    S/2..S tokens, shuffled; ``(input_ids, attention_mask)``."""
    g = torch.Generator().manual_seed(0)
    system = torch.randint(2, vocab_size, (system_len,), generator=g)
    rows, masks = [], []
    for b in range(num_groups):
        prompt = torch.cat([system, torch.randint(2, vocab_size, (prompt_len - b - system_len,), generator=g)])
        for _ in range(group_size):
            length = int(torch.randint(completion_len // 2, completion_len + 1, (1,), generator=g))
            completion = torch.randint(2, vocab_size, (completion_len,), generator=g)
            completion[length:] = PAD
            rows.append(torch.cat([torch.full((b,), PAD), prompt, completion]))
            masks.append(torch.cat([torch.zeros(b), torch.ones(prompt_len - b), torch.arange(completion_len) < length]))
    order = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[order].to(device), torch.stack(masks)[order].long().to(device)


def make_trainer(trainer_class, sizes, rows, completion_len, group_size, device, dtype, folder):
    import datasets
    import transformers
    import trl

    config = transformers.Qwen2Config(max_position_embeddings=32768, pad_token_id=PAD, eos_token_id=EOS, **sizes)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(device=device, dtype=dtype)
    args = trl.GRPOConfig(output_dir=folder, report_to="none", use_cpu=device.type == "cpu",
                          bf16=dtype == torch.bfloat16, num_generations=group_size, per_device_train_batch_size=rows,
                          max_completion_length=completion_len, beta=0.0, save_strategy="no")
    trainer = trainer_class(model=model, reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                            args=args, processing_class=word_tokenizer(),
                            train_dataset=datasets.Dataset.from_dict({"prompt": ["a b"] * rows}))
    # What Trainer.train() does before the first step.
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def time_step(trainer, input_ids, attention_mask, completion_len, device, repeats):
    """``(median ms, peak GiB on CUDA or nan, old-policy log-probs [N, S], tokens of one forward)``
    of one step."""
    model, k = trainer.model, completion_len
    inputs = {"prompt_ids": input_ids[:, :-k], "prompt_mask": attention_mask[:, :-k],
              "completion_ids": input_ids[:, -k:], "completion_mask": attention_mask[:, -k:],
              "advantages": torch.linspace(-1, 1, input_ids.shape[0], device=device),
              "num_items_in_batch": attention_mask[:, -k:].sum()}

    def step():
        with torch.no_grad():
            old, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, k,
                                                                    batch_size=input_ids.shape[0])
        trainer.compute_loss(model, {**inputs, "old_per_token_logps": old}).backward()
        model.zero_grad(set_to_none=True)
        return old

    tokens = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: tokens.append(kwargs["input_ids"].numel()),
                                       with_kwargs=True)
    try:
        old_log_probs = step()
    finally:
        hook.remove()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = measure_ms(step, device, *repeats, whole_steps=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak, old_log_probs, tokens[0]


def bench_config(name, sizes, prompt_len, completion_len, group_size, num_groups, device, dtype, repeats,
                 system_len=0):
    import trl

    from prefix_grouper.integrations.trl import GRPOTrainer

    class OneLevel(GRPOTrainer):
        share_across_groups = False

    input_ids, attention_mask = micro_batch(sizes["vocab_size"], prompt_len, completion_len, group_size,
                                            num_groups, device, system_len)
    trainers = [("trl", trl.GRPOTrainer), ("prefix_grouper", GRPOTrainer)] + ([("one_level", OneLevel)]
                                                                              if system_len else [])
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, trainer_class in trainers:
            trainer = make_trainer(trainer_class, sizes, input_ids.shape[0], completion_len, group_size, device,
                                   dtype, folder)
            results[label] = time_step(trainer, input_ids, attention_mask, completion_len, device, repeats)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    mask = attention_mask[:, -completion_len:].bool()
    max_diff = (results["trl"][2] - results["prefix_grouper"][2]).abs()[mask].max().item()
    trl_ms, ours_ms = results["trl"][0], results["prefix_grouper"][0]
    if "one_level" in results:
        one_level_ms, one_level_tokens = results["one_level"][0], results["one_level"][3]
    else:  # no system prompt: the drop-in's layout is the one-level layout
        one_level_ms, one_level_tokens = math.nan, results["prefix_grouper"][3]
    return {"config": name, "dtype": str(dtype).removeprefix("torch."),
            "rows": input_ids.shape[0], "tokens_trl": int(attention_mask.sum()),
            "tokens_prefix_grouper": results["prefix_grouper"][3], "tokens_one_level": one_level_tokens,
            "one_level_ms": f"{one_level_ms:.1f}", **spread("one_level_ms", one_level_ms, 1),
            "trl_ms": f"{trl_ms:.1f}", **spread("trl_ms", trl_ms, 1), "prefix_grouper_ms": f"{ours_ms:.1f}",
            **spread("prefix_grouper_ms", ours_ms, 1), "speedup": f"{trl_ms / ours_ms:.2f}",
            "speedup_significant": trl_ms.high < ours_ms.low or ours_ms.high < trl_ms.low,
            "trl_peak_gib": f"{results['trl'][1]:.2f}", "prefix_grouper_peak_gib": f"{results['prefix_grouper'][1]:.2f}",
            "max_abs_diff_old_log_probs": f"{max_diff:.1e}"}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    add_size_arguments(parser)
    parser.add_argument("--configs", nargs="*", choices=[c[0] for c in CPU_CONFIGS + GPU_CONFIGS],
                        help="names of configs to run (default: all of this device's)")
    add_output_arguments(parser, "bench_trl")
    return parser


def run(args) -> list[dict]:
    """One row per config (both trainers) for :func:`build_parser`'s options."""
    device, dtype, configs = suite_setup(args, gpu=GPU_CONFIGS, cpu=CPU_CONFIGS, smoke=SMOKE_CONFIGS)
    if args.configs:
        configs = [c for c in (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS) if c[0] in args.configs]
        if not configs:
            raise ValueError(f"--configs: none of {args.configs} is a {device.type} config")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, once per trainer
    return [bench_config(*config[:6], device, dtype, repeats_of(args), *config[6:]) for config in configs]


def summary(rows) -> list[str]:
    return [f"{r['config']}: TRL {r['trl_ms']} ms, grouped {r['prefix_grouper_ms']} ms"
            + (f", one level {r['one_level_ms']} ms" if r["one_level_ms"] != "nan" else "")
            + f" (medians); tokens per forward {r['tokens_trl']} / {r['tokens_prefix_grouper']}"
            + (f" (one level {r['tokens_one_level']})" if r["one_level_ms"] != "nan" else "")
            + f"; peak GiB {r['trl_peak_gib']} / {r['prefix_grouper_peak_gib']}; old log-probs max |diff| "
            f"{r['max_abs_diff_old_log_probs']}" for r in rows]


def ratios(rows) -> list[dict]:
    """The drop-in's speed-up over trl.GRPOTrainer per config (the row's speedup column), and,
    where prompts share a system prompt, over its own one-level layout."""
    found = [{"config": r["config"], "approach": "prefix_grouper", "baseline": "trl", "metric": "ms per step",
              "ratio": r["speedup"], "significant": r["speedup_significant"]} for r in rows]
    return found + [{"config": r["config"], "approach": "prefix_grouper", "baseline": "one_level",
                     "metric": "ms per step",
                     "ratio": f"{float(r['one_level_ms']) / float(r['prefix_grouper_ms']):.2f}",
                     "significant": (float(r["one_level_ms_max"]) < float(r["prefix_grouper_ms_min"])
                                     or float(r["prefix_grouper_ms_max"]) < float(r["one_level_ms_min"]))}
                    for r in rows if r["one_level_ms"] != "nan"]


def plot(rows, path, where):
    bar_chart({"trl.GRPOTrainer": {r["config"]: float(r["trl_ms"]) for r in rows},
               "prefix_grouper GRPOTrainer": {r["config"]: float(r["prefix_grouper_ms"]) for r in rows},
               "prefix_grouper, one level": {r["config"]: float(r["one_level_ms"]) for r in rows
                                             if r["one_level_ms"] != "nan"}},
              path, ylabel="ms per step (median)", title=f"TRL GRPO step (old-policy fwd + loss fwd/bwd): {where}")


def main():
    run_suite("trl", sys.modules[__name__], build_parser().parse_args())


if __name__ == "__main__":
    main()
