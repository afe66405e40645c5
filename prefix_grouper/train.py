"""Train a policy with GRPO, CRPO or GiGPO on a verifiable task, on the grouped layout.

    python -m prefix_grouper.train --algo grpo --steps 200 --out runs/grpo
    python -m prefix_grouper.train --algo gigpo --verify-equivalence --dtype float64
    torchrun --nproc_per_node 2 -m prefix_grouper.train --algo crpo --steps 100 --out runs/crpo

Writes OUT/metrics.jsonl (one JSON object per step) and OUT/rewards.png.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .trainers import (ALGORITHMS, CONVENTIONS, DEFAULT_TASKS, LOSS_TYPES, TINY_MODEL, TrainConfig, Trainer,
                       append_metrics, build_trainer, init_distributed, plot_rewards)
from .trainers.model import DTYPES
from .trainers.tasks import ENVIRONMENTS, TASKS

# Grouped and unpacked forwards differ only in summation order: a few ulp per op, grown
# through the layers and the backward, stays far below these.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m prefix_grouper.train", description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=ALGORITHMS, required=True)
    parser.add_argument("--task", choices=[*TASKS, *ENVIRONMENTS], default=None,
                        help=f"default: {', '.join(f'{a}: {t}' for a, t in DEFAULT_TASKS.items())}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="output directory (default runs/<algo>)")
    parser.add_argument("--model", default=TINY_MODEL,
                        help="'tiny' (2-layer Qwen2 from random init), a transformers model type "
                             "(llama, qwen2, ...: same tiny shape), or a checkpoint path / model id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step,
                        help="prompts (or reset states) per step and rank")
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default=defaults.loss_type)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--num-iterations", type=int, default=defaults.num_iterations)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--epsilon-low", type=float, default=defaults.epsilon_low)
    parser.add_argument("--epsilon-high", type=float, default=defaults.epsilon_high)
    parser.add_argument("--micro-batch-rows", type=int, default=defaults.micro_batch_rows)
    parser.add_argument("--convention", choices=list(CONVENTIONS), default="verl", help="GRPO's advantage eps")
    parser.add_argument("--crpo-mode", choices=["sum_then_normalize", "normalize_then_sum"],
                        default="sum_then_normalize")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--omega", type=float, default=1.0)
    parser.add_argument("--no-prefix-grouper", dest="use_prefix_grouper", action="store_false",
                        help="log-probs from the unpacked [prompt; completion] rows instead of the grouped forward")
    parser.add_argument("--verify-equivalence", action="store_true",
                        help="one step from the same rollouts both ways; exit 1 if loss or gradients differ")
    return parser.parse_args(argv)


def make_trainer(args: argparse.Namespace, dist) -> Trainer:
    config = TrainConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step, lr=args.lr,
                         num_iterations=args.num_iterations, loss_type=args.loss_type,
                         epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high, beta=args.beta,
                         temperature=args.temperature, micro_batch_rows=args.micro_batch_rows,
                         use_prefix_grouper=args.use_prefix_grouper)
    return build_trainer(args.algo, args.task, model=args.model, device=args.device, dtype=args.dtype,
                         seed=args.seed, config=config, convention=args.convention, crpo_mode=args.crpo_mode,
                         gamma=args.gamma, omega=args.omega, dist=dist)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (0 when both are 0, inf when only ``b`` is)."""
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.inf


def verify_equivalence(trainer: Trainer) -> bool:
    """Loss and parameter gradients of one rollout, grouped vs unpacked; prints and returns pass/fail."""
    rollout = trainer.rollout()
    prepared = trainer.prepare(rollout)
    results = {}
    for grouped in (True, False):
        trainer.optimizer.zero_grad(set_to_none=True)
        stats = trainer.accumulate_gradients(prepared, use_prefix_grouper=grouped)
        grads = {n: p.grad.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None}
        results[grouped] = stats["loss"], grads
    (loss_g, grads_g), (loss_u, grads_u) = results[True], results[False]
    if grads_g.keys() != grads_u.keys():
        raise RuntimeError(f"parameters with a gradient differ: {sorted(grads_g.keys() ^ grads_u.keys())}")
    dtype = trainer.policy.model.dtype
    tolerance = TOLERANCES.get(dtype)
    if tolerance is None:
        raise ValueError(f"--verify-equivalence states tolerances for float64 and float32, not {dtype}")
    loss_diff = abs(loss_g - loss_u) / max(1.0, abs(loss_u))
    name, grad_diff = max(((n, relative_difference(grads_g[n], grads_u[n])) for n in grads_g), key=lambda x: x[1])
    ok = loss_diff <= tolerance and grad_diff <= tolerance
    packed = sum(b.layout.total_tokens for b in prepared.batches)
    unpacked = sum(b.layout.unpacked_tokens() for b in prepared.batches)
    print(f"rows {rollout.num_rows} in {len(rollout.group_sizes)} prefix groups; tokens packed {packed}, "
          f"unpacked {unpacked}")
    print(f"loss grouped {loss_g:.12g} unpacked {loss_u:.12g}: relative difference {loss_diff:.3e}")
    print(f"max relative gradient difference over {len(grads_g)} parameters: {grad_diff:.3e} ({name})")
    print(f"tolerance ({dtype}): {tolerance:g} -> {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist, device = init_distributed(args.device)
    args.device = str(device)
    trainer = make_trainer(args, dist)
    if args.verify_equivalence:
        return 0 if verify_equivalence(trainer) else 1
    from tqdm import tqdm

    out = args.out or os.path.join("runs", args.algo)
    leader = dist.rank == 0
    if leader:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "metrics.jsonl"), "w").close()
    progress = tqdm(range(1, args.steps + 1), disable=not leader, desc=f"{args.algo} on {trainer.task.name}")
    for step in progress:
        metrics = {"step": step, **trainer.step()}
        if leader:
            append_metrics(out, metrics)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3f}")
    if leader:
        path = plot_rewards(out, f"{args.algo} on {trainer.task.name} ({args.model}, G={args.group_size})")
        print(f"wrote {os.path.join(out, 'metrics.jsonl')} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
