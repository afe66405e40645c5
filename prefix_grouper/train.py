"""Train a policy with GRPO, CRPO or GiGPO on a verifiable task, on the grouped layout.

    python -m prefix_grouper.train --algo grpo --steps 200 --out runs/grpo
    python -m prefix_grouper.train --algo gigpo --verify-equivalence --dtype float64
    python -m prefix_grouper.train --algo gigpo --task keydoor-history   # prefix trees; learns within the default 200 steps
    torchrun --nproc_per_node 2 -m prefix_grouper.train --algo crpo --steps 100 --out runs/crpo

Writes OUT/metrics.jsonl (one JSON object per step) and OUT/rewards.png (where matplotlib
is installed: ``pip install matplotlib``, or the ``bench`` extra), and ends with a one-line
summary. Invalid arguments are usage errors (exit status 2); a run that fails later says so
in one line (exit status 1), its traceback in OUT/traceback.txt and the steps before it kept.
"""
from __future__ import annotations

import math
import os
import sys
import traceback

from .cli_arguments import (AUTO_DEVICE, DEVICE_HELP, UsageErrorParser, check_device, check_output_dir,
                            device_argument, finite_float, make_output_dir, non_negative_float, positive_float,
                            positive_int, unit_float)

PROG = "python -m prefix_grouper.train"
# What the command line offers, named here so that --help and usage errors need no torch
# (the trainers import it); tests/test_cli.py checks each against the trainers' own.
ALGORITHMS = ("grpo", "crpo", "gigpo")                    # trainers.ALGORITHMS
DEFAULT_TASKS = {"grpo": "digits", "crpo": "diagnosis", "gigpo": "keydoor"}
TASKS = ("digits", "diagnosis")                          # one-step tasks (reward channels)
ENVIRONMENTS = ("keydoor", "keydoor-history")            # multi-step environments
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
CONVENTIONS = ("verl", "trl", "openrlhf")                # GRPO advantage eps of each framework
DTYPES = ("float32", "float64", "bfloat16")
TINY_MODEL = "tiny"
CONFIG_DEFAULTS = dict(group_size=8, prompts_per_step=8, lr=1e-3, num_iterations=1, loss_type="grpo",
                       epsilon_low=0.2, epsilon_high=0.2, beta=0.0, temperature=1.0, micro_batch_rows=512)
# Grouped and unpacked forwards differ only in summation order: a few ulp per op, grown
# through the layers and the backward, stays far below these. bfloat16 has none: its
# rounding (4e-3) would hide a real difference.
TOLERANCES = {"float64": 1e-10, "float32": 1e-5}


def build_parser() -> UsageErrorParser:
    d = CONFIG_DEFAULTS
    parser = UsageErrorParser(prog=PROG, description=__doc__, synopsis="--algo {grpo,crpo,gigpo} [options]")
    parser.add_argument("--algo", choices=ALGORITHMS, required=True, help="the RL algorithm (required)")
    parser.add_argument("--task", choices=[*TASKS, *ENVIRONMENTS], default=None,
                        help=f"the task or environment (default: "
                             f"{', '.join(f'{a}: {t}' for a, t in DEFAULT_TASKS.items())}; gigpo needs an "
                             f"environment, crpo a task)")
    parser.add_argument("--steps", type=positive_int, default=200, help="optimizer steps")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<algo>)")
    parser.add_argument("--model", default=TINY_MODEL,
                        help="'tiny' (2-layer Qwen2 from random init), a transformers model type whose attention "
                             "goes through its AttentionInterface (llama, qwen2, ...: same tiny shape), or a local "
                             "checkpoint directory / model id")
    parser.add_argument("--device", type=device_argument, default=AUTO_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the policy's parameter dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init and the sampling")
    parser.add_argument("--group-size", type=positive_int, default=d["group_size"], help="completions per prompt (G)")
    parser.add_argument("--prompts-per-step", type=positive_int, default=d["prompts_per_step"],
                        help="prompts (or reset states) per step and rank")
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default=d["loss_type"],
                        help="how token losses are averaged (TRL's names)")
    parser.add_argument("--lr", type=positive_float, default=d["lr"], help="Adam learning rate")
    parser.add_argument("--num-iterations", type=positive_int, default=d["num_iterations"],
                        help="updates per rollout batch (above 1, the clipped ratio matters)")
    parser.add_argument("--beta", type=non_negative_float, default=d["beta"],
                        help="weight of the KL penalty to the initial policy")
    parser.add_argument("--temperature", type=positive_float, default=d["temperature"],
                        help="sampling temperature, also dividing the logits of the log-probs")
    parser.add_argument("--epsilon-low", type=unit_float, default=d["epsilon_low"],
                        help="the ratio's lower clip: 1 - epsilon_low")
    parser.add_argument("--epsilon-high", type=non_negative_float, default=d["epsilon_high"],
                        help="the ratio's upper clip: 1 + epsilon_high")
    parser.add_argument("--micro-batch-rows", type=positive_int, default=d["micro_batch_rows"],
                        help="completion rows per micro-batch (whole groups; gradients accumulate)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="verl",
                        help="GRPO's advantage eps: verl 1e-6, trl 1e-4, openrlhf 1e-9")
    parser.add_argument("--crpo-mode", choices=["sum_then_normalize", "normalize_then_sum"],
                        default="sum_then_normalize", help="CRPO: where the reward channels are summed")
    parser.add_argument("--gamma", type=unit_float, default=0.95, help="GiGPO: discount of the step returns")
    parser.add_argument("--omega", type=finite_float, default=1.0,
                        help="GiGPO: weight of the step-level advantage beside the episode-level one")
    parser.add_argument("--no-prefix-grouper", dest="use_prefix_grouper", action="store_false",
                        help="log-probs from the unpacked [prompt; completion] rows instead of the grouped forward "
                             "(default: grouped)")
    parser.add_argument("--verify-equivalence", action="store_true",
                        help="one step from the same rollouts both ways, nothing trained or written; exit 1 if loss "
                             "or gradients differ (float32 or float64)")
    return parser


def check_combinations(parser: UsageErrorParser, args) -> None:
    """Usage errors that need more than one argument, or the file system: no torch needed."""
    task = args.task or DEFAULT_TASKS[args.algo]
    if args.algo == "gigpo" and task not in ENVIRONMENTS:
        parser.error(f"--algo gigpo needs a multi-step environment ({', '.join(ENVIRONMENTS)}), got --task {task}")
    if args.algo == "crpo" and task in ENVIRONMENTS:
        parser.error(f"--algo crpo needs a task with reward channels ({', '.join(TASKS)}), got the environment "
                     f"--task {task}")
    if args.verify_equivalence and args.dtype not in TOLERANCES:
        parser.error(f"--verify-equivalence compares in {' or '.join(TOLERANCES)} (--dtype {args.dtype} rounds "
                     f"too coarsely to tell a real difference), got --dtype {args.dtype}")
    if not args.verify_equivalence:
        check_output_dir(parser, "--out", args.out or os.path.join("runs", args.algo))
    if os.path.isabs(args.model) or args.model.startswith((".", "~")):  # a path, not a model id or type
        path = os.path.expanduser(args.model)
        if not os.path.isdir(path):
            parser.error(f"argument --model: {args.model}: no such directory")
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"argument --model: {args.model} is a directory without config.json: name a transformers "
                     f"checkpoint directory (save_pretrained's), a model id or a model type")


def check_with_torch(parser: UsageErrorParser, args) -> None:
    """Usage errors that need torch or transformers to judge (imports them): the device, the
    temperature against the dtype's range, and the model."""
    import torch

    from .logprobs.api import check_inverse_temperature

    args.device = str(check_device(parser, args.device))
    try:
        check_inverse_temperature(args.temperature, getattr(torch, args.dtype))
    except ValueError as error:
        parser.error(f"argument --temperature: {error}")
    if args.model != TINY_MODEL:
        check_model(parser, args.model, needs_grouped_attention=args.use_prefix_grouper or args.verify_equivalence)


def check_model(parser: UsageErrorParser, model: str, *, needs_grouped_attention: bool) -> None:
    """A usage error unless ``model`` names a transformers causal LM (type, directory or id)
    whose attention runs through transformers' AttentionInterface, where prefix_grouper's
    grouped attention goes in. Reads the config only (no weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = (AutoConfig.for_model(model) if model in CONFIG_MAPPING_NAMES
                  else AutoConfig.from_pretrained(os.path.expanduser(model)))
    except (OSError, ValueError) as error:  # no such id (or offline), no model_type in config.json
        parser.error(f"argument --model: {model}: cannot load its config: {first_line(error)}")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        parser.error(f"argument --model: {model}: model type {config.model_type!r} has no causal LM in transformers "
                     f"(AutoModelForCausalLM)")
    if needs_grouped_attention and not getattr(model_class, "_supports_attention_backend", False):
        parser.error(f"argument --model: {model}: {model_class.__name__} does not run its attention through "
                     f"transformers' AttentionInterface, so the grouped attention cannot go in (use e.g. llama, "
                     f"qwen2, mistral or gemma2)")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_args(argv: list[str] | None = None):
    """The parsed arguments, every check passed (else a usage error: exit status 2). Imports
    torch only once the arguments that need none have passed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_combinations(parser, args)
    check_with_torch(parser, args)
    args.parser = parser
    return args


def make_trainer(args, dist):
    from .trainers import TrainConfig, build_trainer

    config = TrainConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step, lr=args.lr,
                         num_iterations=args.num_iterations, loss_type=args.loss_type,
                         epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high, beta=args.beta,
                         temperature=args.temperature, micro_batch_rows=args.micro_batch_rows,
                         use_prefix_grouper=args.use_prefix_grouper)
    return build_trainer(args.algo, args.task, model=args.model, device=args.device, dtype=args.dtype,
                         seed=args.seed, config=config, convention=args.convention, crpo_mode=args.crpo_mode,
                         gamma=args.gamma, omega=args.omega, dist=dist)


def relative_difference(a, b) -> float:
    """``max|a - b| / max|b|`` (0 when both are 0, inf when only ``b`` is)."""
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.inf


def verify_equivalence(trainer) -> bool:
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
    tolerance = TOLERANCES.get(str(dtype).removeprefix("torch."))
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
    from .trainers import init_distributed

    dist, device = init_distributed(args.device)
    args.device = str(device)
    if args.verify_equivalence:
        ok = verify_equivalence(make_trainer(args, dist))
        print(f"{args.algo} --verify-equivalence: {'PASS' if ok else 'FAIL'} (grouped vs unpacked loss and gradients, "
              f"{args.dtype}); nothing written")
        return 0 if ok else 1
    out = args.out or os.path.join("runs", args.algo)
    leader = dist.rank == 0
    if leader:
        make_output_dir(args.parser, "--out", out)
        open(os.path.join(out, "metrics.jsonl"), "w").close()
    try:
        train(args, make_trainer(args, dist), out, leader)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted after {steps_written(out)} step(s), kept in {out}/metrics.jsonl", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user, the traceback on disk, the steps done kept
        where = os.path.join(out, "traceback.txt")
        if leader:
            with open(where, "w") as f:
                f.write(traceback.format_exc())
        print(f"{PROG}: failed after {steps_written(out)} step(s), kept in {out}/metrics.jsonl: "
              f"{type(error).__name__}: {first_line(error)} (traceback in {where})", file=sys.stderr)
        return 1
    return 0


def steps_written(out: str) -> int:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def train(args, trainer, out: str, leader: bool) -> None:
    """Run ``args.steps`` steps, each appended to ``out``/metrics.jsonl by the leader as it
    ends; then the plot and the summary line."""
    from tqdm import tqdm

    from .trainers import append_metrics, plot_rewards

    rewards = []
    name = f"{args.algo} on {trainer.task.name}"
    progress = tqdm(range(1, args.steps + 1), disable=not leader, desc=name)
    for step in progress:
        metrics = {"step": step, **trainer.step()}
        rewards.append(metrics["reward_mean"])
        if leader:
            append_metrics(out, metrics)
            progress.set_postfix_str(progress_text(metrics))
    if leader:
        # The metrics are on disk already: a missing plotting library costs the plot only.
        plot = plot_rewards(out, f"{name} ({args.model}, G={args.group_size})")
        written = os.path.join(out, "metrics.jsonl") + (f" and {plot}" if plot else "")
        print(f"{name}: {args.steps} steps, mean reward {rewards[0]:.3f} -> {rewards[-1]:.3f} (first -> last step); "
              f"wrote {written}")


def progress_text(metrics: dict) -> str:
    """The progress bar's readout: reward, KL, clip fraction and the loss, each to 4
    significant digits (GRPO's loss is ~0 at the first iteration by construction: it reads
    as -1.234e-09, not 0.000)."""
    return ", ".join(f"{name}={metrics[key]:.4g}" for name, key in
                     (("reward", "reward_mean"), ("kl", "kl"), ("clip", "clip_frac"), ("loss", "loss")))


if __name__ == "__main__":
    sys.exit(main())
