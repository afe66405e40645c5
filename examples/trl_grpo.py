"""GRPO through TRL with prefix_grouper's drop-in GRPOTrainer: each prompt is encoded once per
group of completions instead of once per completion.

Everything is made here, nothing is downloaded: a 2-layer Qwen2 built from a config (random
weights), a character-level tokenizer, a toy task (answer with the prompt's first letter)
and its reward. Two steps on a CPU take well under a minute:

    python examples/trl_grpo.py                 # 2 steps; per-step logs in runs/trl_grpo/log_history.json
    python examples/trl_grpo.py --steps 50 --out /tmp/trl_grpo

The one line that differs from a plain TRL script is the GRPOTrainer import.
"""
from __future__ import annotations

import argparse
import json
import os
import random

import datasets
import torch
import transformers
import trl
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from prefix_grouper.integrations.trl import GRPOTrainer  # instead of: from trl import GRPOTrainer

LETTERS = "abcdefgh"
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per character of LETTERS and the space, plus <pad>, <eos> and <unk>."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *LETTERS, " "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # decode without spaces between the characters
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def tiny_model(tokenizer: transformers.PreTrainedTokenizerFast) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                                      tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def prompts(count: int, seed: int) -> list[str]:
    """Random strings of 3 to 8 letters: the task is to repeat the first letter."""
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8))) + " " for _ in range(count)]


def first_letter_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The fraction of the completion's characters that are the prompt's first letter."""
    return [sum(c == p[0] for c in completion) / max(len(completion), 1)
            for p, completion in zip(prompts, completions)]


def main(argv: list[str] | None = None) -> trl.GRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps (default: %(default)s)")
    parser.add_argument("--out", default="runs/trl_grpo",
                        help="TRL's output_dir; log_history.json (TRL's per-step logs) is written there, no "
                             "checkpoint (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = trl.GRPOConfig(
        output_dir=args.out, max_steps=args.steps, learning_rate=1e-3, per_device_train_batch_size=8,
        num_generations=4,  # 2 prompts per step, 4 completions each: each prompt is encoded once, not 4 times
        max_completion_length=8, temperature=1.0, beta=0.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, seed=0)
    trainer = GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=first_letter_reward, args=config,
                          processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts(64, seed=0)}))
    trainer.train()
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"step {log['step']}: loss {log['loss']:.4g}, reward {log.get('reward', float('nan')):.4g}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "log_history.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trainer.state.log_history, f, indent=1)
    print(f"wrote {path}")
    return trainer


if __name__ == "__main__":
    main()
