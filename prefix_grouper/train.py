"""Train a policy with GRPO, CRPO or GiGPO on a verifiable task, on the grouped layout.

    python -m prefix_grouper.train --algo grpo --steps 200 --out runs/grpo
    python -m prefix_grouper.train --algo gigpo --verify-equivalence --dtype float64
    python -m prefix_grouper.train --algo gigpo --task keydoor-history --steps 100   # prefix trees
    torchrun --nproc_per_node 2 -m prefix_grouper.train --algo crpo --steps 100 --out runs/crpo

Writes OUT/metrics.jsonl (one JSON object per step) and OUT/rewards.png (where matplotlib
is installed: ``pip install matplotlib``, or the ``bench`` extra). Invalid arguments are usage
errors (exit status 2).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .logprobs.api import check_inverse_temperature
from .trainers import (ALGORITHMS, CONVENTIONS, DEFAULT_TASKS, LOSS_TYPES, TINY_MODEL, TrainConfig, Trainer,
                       append_metrics, build_trainer, init_distributed, plot_rewards)
from .trainers.model import DTYPES
from .trainers.tasks import ENVIRONMENTS, TASKS

# Grouped and unpacked forwards differ only in summation order: a few ulp per op, grown
# through the layers and the backward, stays far below these.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


def positive_int(text: str) -> int:
    value = int(text)  # a ValueError reads "invalid positive_int value: 'x'"
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that need more than one argument (exit status 2, no traceback)."""
    task = args.task or DEFAULT_TASKS[args.algo]
    if args.algo == "gigpo" and task not in ENVIRONMENTS:
        parser.error(f"--algo gigpo needs a multi-step environment ({', '.join(ENVIRONMENTS)}), got --task {task}")
    if args.algo == "crpo" and task in ENVIRONMENTS:
        parser.error(f"--algo crpo needs a task with reward channels ({', '.join(TASKS)}), got the environment "
                     f"--task {task}")
    if args.out is not None:
        # The directory, or any folder above it, must not be an existing file (os.makedirs would fail).
        path = os.path.abspath(args.out)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            parser.error(f"--out {args.out}: {path} is an existing file; name a directory (it will hold "
                         f"metrics.jsonl and the plot)")
    try:
        check_inverse_temperature(args.temperature, DTYPES[args.dtype])
    except ValueError as error:
        parser.error(f"argument --temperature: {error}")
    try:
        torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device (use --device cpu)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m prefix_grouper.train", description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=ALGORITHMS, required=True)
    parser.add_argument("--task", choices=[*TASKS, *ENVIRONMENTS], default=None,
                        help=f"default: {', '.join(f'{a}: {t}' for a, t in DEFAULT_TASKS.items())}")
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--out", default=None, help="output directory (default runs/<algo>)")
    parser.add_argument("--model", default=TINY_MODEL,
                        help="'tiny' (2-layer Qwen2 from random init), a transformers model type "
                             "(llama, qwen2, ...: same tiny shape), or a checkpoint path / model id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=positive_int, default=defaults.group_size)
    parser.add_argument("--prompts-per-step", type=positive_int, default=defaults.prompts_per_step,
                        help="prompts (or reset states) per step and rank")
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default=defaults.loss_type)
    parser.add_argument("--lr", type=positive_float, default=defaults.lr)
    parser.add_argument("--num-iterations", type=positive_int, default=defaults.num_iterations)
    parser.add_argument("--beta", type=non_negative_float, default=defaults.beta)
    parser.add_argument("--temperature", type=positive_float, default=defaults.temperature)
    parser.add_argument("--epsilon-low", type=unit_float, default=defaults.epsilon_low)
    parser.add_argument("--epsilon-high", type=non_negative_float, default=defaults.epsilon_high)
    parser.add_argument("--micro-batch-rows", type=positive_int, default=defaults.micro_batch_rows)
    parser.add_argument("--convention", choices=list(CONVENTIONS), default="verl", help="GRPO's advantage eps")
    parser.add_argument("--crpo-mode", choices=["sum_then_normalize", "normalize_then_sum"],
                        default="sum_then_normalize")
    parser.add_argument("--gamma", type=unit_float, default=0.95)
    parser.add_argument("--omega", type=finite_float, default=1.0)
    parser.add_argument("--no-prefix-grouper", dest="use_prefix_grouper", action="store_false",
                        help="log-probs from the unpacked [prompt; completion] rows instead of the grouped forward")
    parser.add_argument("--verify-equivalence", action="store_true",
                        help="one step from the same rollouts both ways; exit 1 if loss or gradients differ")
    args = parser.parse_args(argv)
    check_combinations(parser, args)
    return args


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
    packed = sum(b.packed_tokens for b in prepared.batches)
    unpacked = sum(b.layout.unpacked_tokens() for b in prepared.batches)
    layout = "a prefix tree per micro-batch" if rollout.history else f"{len(rollout.group_sizes)} prefix groups"
    print(f"rows {rollout.num_rows} in {layout}; tokens packed {packed}, unpacked {unpacked}")
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
            progress.set_postfix_str(progress_text(metrics))
    if leader:
        metrics_path = os.path.join(out, "metrics.jsonl")
        # The metrics are on disk already: a missing plotting library costs the plot only.
        path = plot_rewards(out, f"{args.algo} on {trainer.task.name} ({args.model}, G={args.group_size})")
        print(f"wrote {metrics_path}" + (f" and {path}" if path else ""))
    return 0


def progress_text(metrics: dict) -> str:
    """The progress bar's readout: reward, KL, clip fraction and the loss, each to 4
    significant digits (GRPO's loss is ~0 at the first iteration by construction: it reads
    as -1.234e-09, not 0.000)."""
    return ", ".join(f"{name}={metrics[key]:.4g}" for name, key in
                     (("reward", "reward_mean"), ("kl", "kl"), ("clip", "clip_frac"), ("loss", "loss")))


if __name__ == "__main__":
    sys.exit(main())
