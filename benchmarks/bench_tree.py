"""Prefix trees: attention fwd+bwd on the tree of a batch's sequences against the unpacked
rows and the one-level (prompt -> completions) layout, and the tree's build time.

Shapes (lengths as below on a GPU; divided by 8 on a CPU, by 16 with --quick on a CPU):
  (a) system prompt  a 2,048-token system prompt, 8 questions of 256 tokens, G=8 completions of
                     512 each; one level shares a question's prompt (system prompt included)
                     within its group only, the tree shares the system prompt across groups too
  (b) multi-turn     a 1,024-token prompt, 4 turns of 256 tokens, branching G=4 at turn 1 and 2 at
                     each later turn (32 trajectories); one level: the prompt, then 32 completions
  (c) history        per-step samples of 8-step episodes (2 reset states x G=8 episodes): step t's
                     prompt is the 512-token first observation, then per earlier step its 64-token
                     action and 256-token observation; its completion the step's action. One
                     level groups identical prompts only (the G first steps of a reset state)
  (d) GRPO           4 prompts of 1,024 tokens, G=8 completions of 512: the depth-1 tree, where
                     tree and one level are the same layout (a regression check)

Every shape is a list of token sequences; the tree is ``GroupLayout.from_sequences``. One
random q/k/v per tree token is gathered into the one-level layout and the unpacked rows, so
all approaches compute the same attention; each one's outputs are checked against the tree's
before timing. Approaches: ``unpacked`` (each sequence its own row, SDPA causal, one padded
batch), ``looped`` (the same rows unpadded, one SDPA call per row), ``one-level <backend>``
and ``tree <backend>`` (``prefix_attention``; the torch backend, and Triton and flash on a
GPU: where flash refuses the call, on CPU or in float32, its two rows hold its reason in
``error`` and no time). Per row: unpacked, one-level and tree tokens,
fwd+bwd ms (median, min, max) and peak extra memory. On CPU the approaches are timed in
interleaved rounds (at least ``CPU_ROUNDS``), so that load elsewhere on a shared machine hits
them all alike. One more row times ``from_sequences``
on 512 sequences of 4,096 tokens (a 1,024-token system prompt, 64 questions of 512, G=8
completions of 2,560) at full size on every device (64 x 512 with --smoke).

    python -m benchmarks.bench_tree --quick
    python -m benchmarks.run --suite tree --quick

Writes ``tree_<device>.csv``, ``_ratios.csv`` and ``.png`` under ``runs/bench_tree/`` (or
``--out`` / ``--update-results``).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Iterator

import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.unpacked import unpacked_attention_rows

from .attention_contenders import looped_rows, run_looped
from .common import (add_device_arguments, add_output_arguments, add_size_arguments, bar_chart, device_of,
                     flash_refusal, measure_interleaved_ms, measure_ms, peak_extra_mib, ratios as ratios_of,
                     repeats_of, run_suite, spread, table_lines)

BASELINES = ("unpacked", "looped", "one-level torch")
CPU_ROUNDS = 9
"""Interleaved fwd+bwd rounds on CPU at least: enough for min-max ranges that separate."""
# Random token ids below SIBLING_ID; a segment's first token is SIBLING_ID + its index among
# its siblings, so siblings differ at their first token and share exactly the intended prefix.
SIBLING_ID = 30000
NAN = float("nan")


class Shape:
    """Token sequences built from segments, and their one-level grouping: ``groups`` lists
    ``(prompt length, sequence indices)``, the sequences of a group sharing that prompt."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.sequences: list[torch.Tensor] = []
        self.groups: list[tuple[int, list[int]]] = []

    def segment(self, length: int, sibling: int) -> torch.Tensor:
        tokens = torch.randint(0, SIBLING_ID, (length,), generator=self.generator)
        tokens[0] = SIBLING_ID + sibling
        return tokens


def scaled(length: int, divisor: int) -> int:
    return max(1, length // divisor)


def system_prompt_shape(divisor: int) -> Shape:
    shape = Shape(0)
    system = shape.segment(scaled(2048, divisor), 0)
    for q in range(8):
        prompt = torch.cat([system, shape.segment(scaled(256, divisor), q)])
        first = len(shape.sequences)
        shape.sequences += [torch.cat([prompt, shape.segment(scaled(512, divisor), g)]) for g in range(8)]
        shape.groups.append((len(prompt), list(range(first, first + 8))))
    return shape


def multi_turn_shape(divisor: int) -> Shape:
    shape = Shape(1)
    prompt = shape.segment(scaled(1024, divisor), 0)
    paths = [prompt]
    for branching in (4, 2, 2, 2):
        paths = [torch.cat([path, shape.segment(scaled(256, divisor), b)]) for path in paths for b in range(branching)]
    shape.sequences = paths
    shape.groups = [(len(prompt), list(range(len(paths))))]
    return shape


def history_shape(divisor: int) -> Shape:
    shape = Shape(2)
    for reset in range(2):  # reset states
        first_observation = shape.segment(scaled(512, divisor), reset)
        first_steps = []
        for episode in range(8):
            history = first_observation
            for step in range(8):
                action = shape.segment(scaled(64, divisor), episode)
                if step == 0:
                    first_steps.append(len(shape.sequences))
                else:
                    shape.groups.append((len(history), [len(shape.sequences)]))
                shape.sequences.append(torch.cat([history, action]))
                history = torch.cat([history, action, shape.segment(scaled(256, divisor), 0)])
        shape.groups.append((len(first_observation), first_steps))
    return shape


def grpo_shape(divisor: int) -> Shape:
    shape = Shape(3)
    for p in range(4):
        prompt = shape.segment(scaled(1024, divisor), p)
        first = len(shape.sequences)
        shape.sequences += [torch.cat([prompt, shape.segment(scaled(512, divisor), g)]) for g in range(8)]
        shape.groups.append((len(prompt), list(range(first, first + 8))))
    return shape


SHAPES = [("(a) system prompt", system_prompt_shape), ("(b) multi-turn", multi_turn_shape),
          ("(c) history", history_shape), ("(d) GRPO depth 1", grpo_shape)]


def build_shape_sequences(num_sequences: int, length: int, seed: int = 4) -> list[torch.Tensor]:
    """The build-time row's batch: a system prompt (1/4 of ``length``), questions (1/8) each
    shared by 8 completions (the rest)."""
    shape = Shape(seed)
    system = shape.segment(length // 4, 0)
    sequences = []
    for q in range(num_sequences // 8):
        prompt = torch.cat([system, shape.segment(length // 8, q)])
        sequences += [torch.cat([prompt, shape.segment(length - len(prompt), g)]) for g in range(8)]
    return sequences


def one_level(shape: Shape, tree: GroupLayout) -> tuple[GroupLayout, torch.Tensor, list[torch.Tensor]]:
    """``(layout, index [T1] of every one-level token on the tree's axis, per-sequence positions
    on the one-level axis)`` of the shape's one-level grouping."""
    index, positions, start = [], [None] * len(shape.sequences), 0
    for prompt_len, members in shape.groups:
        prompt = torch.arange(start, start + prompt_len)
        index.append(tree.sequence_positions(members[0]).cpu()[:prompt_len])
        start += prompt_len
        for i in members:
            suffix = tree.sequence_positions(i).cpu()[prompt_len:]
            index.append(suffix)
            positions[i] = torch.cat([prompt, torch.arange(start, start + len(suffix))])
            start += len(suffix)
    layout = GroupLayout.from_lengths([p for p, _ in shape.groups],
                                      [[len(shape.sequences[i]) - p for i in members] for p, members in shape.groups],
                                      device=tree.device)
    return layout, torch.cat(index).to(tree.device), [p.to(tree.device) for p in positions]


def padded_index(positions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N, L], valid [N, L])``: per-sequence positions right-padded (with 0)."""
    width = max(len(p) for p in positions)
    index = torch.zeros(len(positions), width, dtype=torch.long, device=positions[0].device)
    valid = torch.zeros(len(positions), width, dtype=torch.bool, device=positions[0].device)
    for i, p in enumerate(positions):
        index[i, :len(p)] = p
        valid[i, :len(p)] = True
    return index, valid


def approaches(tree: GroupLayout, flat: GroupLayout, to_flat: torch.Tensor, rows: torch.Tensor,
               backends: list[str]) -> dict:
    """``{name: (prepare, run, rows_index)}`` of the unpacked rows and every backend's one-level
    and tree rows: ``prepare`` maps the tree's q/k/v to the approach's input, ``run`` is timed,
    ``rows_index`` maps its output to ``[N, L]`` rows."""
    made = {"unpacked": (lambda x: x[rows], unpacked_attention_rows, None),
            "looped": (None, run_looped, "looped")}
    for backend in backends:
        made[f"one-level {backend}"] = (lambda x: x[to_flat],
                                        (lambda b: lambda q, k, v: prefix_attention(q, k, v, flat, backend=b))(backend),
                                        "flat")
        made[f"tree {backend}"] = (lambda x: x,
                                   (lambda b: lambda q, k, v: prefix_attention(q, k, v, tree, backend=b))(backend),
                                   "tree")
    return made


def bench_shape(name: str, shape: Shape, device, dtype, heads, repeats) -> Iterator[dict]:
    hq, hkv, d = heads
    tree = GroupLayout.from_sequences(shape.sequences, device=device)
    flat, to_flat, flat_positions = one_level(shape, tree)
    tree_rows, valid = padded_index([tree.sequence_positions(i) for i in range(len(shape.sequences))])
    flat_rows, _ = padded_index(flat_positions)
    unpacked_tokens = sum(len(s) for s in shape.sequences)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(tree.total_tokens, h, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
    tokens = {"unpacked": unpacked_tokens, "looped": unpacked_tokens, "flat": flat.total_tokens,
              "tree": tree.total_tokens}
    reference = None
    agreement = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4

    def row(approach, kind, err, ms, mib, agrees, error):
        return {"config": name, "approach": approach, "measured": "attention fwd+bwd",
                "dtype": str(dtype).replace("torch.", ""), "hq": hq, "hkv": hkv, "d": d,
                "unpacked_tokens": unpacked_tokens, "one_level_tokens": flat.total_tokens,
                "tree_tokens": tree.total_tokens, "tokens": tokens[kind], "max_abs_diff_vs_unpacked": f"{err:.3e}",
                "agrees": agrees, "ms": f"{ms:.3f}", **spread("ms", ms), "peak_extra_mib": f"{mib:.1f}",
                "error": error}

    # Triton on CPU is its interpreter, whose timings say nothing about the kernels.
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    flash_refused = flash_refusal(device, dtype, d)
    if flash_refused is None:
        backends.append("flash")
    made = approaches(tree, flat, to_flat, tree_rows, backends)
    looped_inputs = looped_rows(q, k, v, tree)
    measured, fields = {}, {}  # approach -> fwd+bwd closure; approach -> its row's fields
    for approach, (prepare, run, kind) in made.items():
        inputs = looped_inputs if kind == "looped" else [prepare(x) for x in (q, k, v)]
        leaves = [[y.detach().requires_grad_() for y in x] if isinstance(x, list) else x.detach().requires_grad_()
                  for x in inputs]
        try:
            with torch.no_grad():
                out = run(*inputs)
            if kind == "looped":
                as_rows = torch.nn.utils.rnn.pad_sequence(list(out), batch_first=True)
            else:
                as_rows = out if kind is None else out[{"flat": flat_rows, "tree": tree_rows}[kind]]
            if reference is None:
                reference = as_rows.float()
            err = (as_rows.float() - reference)[valid].abs().max().item()
            grad_out = [torch.randn_like(x) for x in out] if kind == "looped" else torch.randn_like(out)
            measured[approach] = (lambda run, leaves, grad_out: lambda: run(*leaves).backward(grad_out))(
                run, leaves, grad_out)
            fields[approach] = dict(err=err, error="")
        except Exception as failure:  # one approach a backend lacks must not cost the others' rows
            error = f"{type(failure).__name__}: {failure}"[:200]
            print(f"WARNING: {approach} failed on {name}: {error}")
            fields[approach] = dict(err=NAN, error=error, ms=NAN, mib=NAN)
    if device.type == "cuda":
        times = {approach: measure_ms(fwd_bwd, device, *repeats) for approach, fwd_bwd in measured.items()}
    else:
        rounds = repeats[1] if repeats[1] == 1 else max(CPU_ROUNDS, repeats[1])  # --smoke: one
        _, times = measure_interleaved_ms(measured, (repeats[0], rounds))
    for approach, fwd_bwd in measured.items():
        fields[approach].update(ms=times[approach], mib=peak_extra_mib(fwd_bwd, device))
    for approach, (_, _, kind) in made.items():
        f = fields[approach]
        if f["err"] > agreement:
            print(f"WARNING: {approach} differs from the unpacked rows by {f['err']:.2e} on {name}")
        yield row(approach, kind or "unpacked", f["err"], f["ms"], f["mib"], f["err"] <= agreement, f["error"])
    if flash_refused is not None:
        print(f"{name}, flash: not run: {flash_refused}", flush=True)
        for approach, kind in (("one-level flash", "flat"), ("tree flash", "tree")):
            yield row(approach, kind, NAN, NAN, NAN, "", f"not run: {flash_refused}")


def bench_build(num_sequences: int, length: int, device, repeats) -> dict:
    sequences = build_shape_sequences(num_sequences, length)
    tree = GroupLayout.from_sequences(sequences, device=device)
    ms = measure_ms(lambda: GroupLayout.from_sequences(sequences, device=device), device, *repeats, whole_steps=True)
    name = f"build {num_sequences}x{length}"
    return {"config": name, "approach": "from_sequences", "measured": "layout build", "dtype": "int64",
            "hq": "", "hkv": "", "d": "", "unpacked_tokens": num_sequences * length, "one_level_tokens": "",
            "tree_tokens": tree.total_tokens, "tokens": num_sequences * length, "max_abs_diff_vs_unpacked": "",
            "agrees": True, "ms": f"{ms:.3f}", **spread("ms", ms), "peak_extra_mib": "", "error": ""}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    add_size_arguments(parser)
    add_output_arguments(parser, "bench_tree")
    return parser


def run(args) -> Iterator[dict]:
    """One row per shape and approach, then the build-time row, each as soon as measured."""
    device = device_of(args)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    heads = (16, 4, 128) if gpu else (4, 2, 32)
    if args.smoke:
        divisor, heads = 64, (2, 1, 8)
    else:
        divisor = (2 if gpu else 16) if args.quick else (1 if gpu else 8)
    repeats = repeats_of(args)
    for name, make in SHAPES:
        yield from bench_shape(name, make(divisor), device, dtype, heads, repeats)
    yield bench_build(*((64, 512) if args.smoke else (512, 4096)), device, repeats)


def summary(rows) -> list[str]:
    """Tokens and medians (ranges in the CSV), and the token ratios trees buy."""
    lines = table_lines(rows, [
        ("config", -20, "config"), ("approach", -18, "approach"), ("unpacked", 10, "unpacked_tokens"),
        ("one-level", 10, "one_level_tokens"), ("tree", 9, "tree_tokens"), ("ms", 11, "ms"),
        ("peak MiB", 10, "peak_extra_mib"), ("diff", 11, "max_abs_diff_vs_unpacked"),
        ("", 0, lambda r: f"  {r['error']}" if r["error"] else "")])
    for config in dict.fromkeys(r["config"] for r in rows if r["measured"] == "attention fwd+bwd"):
        r = next(r for r in rows if r["config"] == config)
        lines.append(f"{config}: tree holds 1/{r['unpacked_tokens'] / r['tree_tokens']:.1f} of the unpacked tokens, "
                     f"1/{r['one_level_tokens'] / r['tree_tokens']:.2f} of the one-level layout's")
    return lines


def ratios(rows) -> list[dict]:
    """fwd+bwd speed-ups against the unpacked rows and the one-level layout, each marked significant or not."""
    timed = [r for r in rows if r["measured"] == "attention fwd+bwd" and math.isfinite(float(r["ms"]))]
    return ratios_of(timed, config="config", approach="approach", metric="ms", baselines=BASELINES)


def plot(rows, path, where):
    """fwd+bwd times per shape and approach."""
    series = {}
    for r in rows:
        if r["measured"] == "attention fwd+bwd" and math.isfinite(float(r["ms"])):
            series.setdefault(r["approach"], {})[r["config"]] = float(r["ms"])
    bar_chart(series, path, ylabel="ms (median, log)", log_scale=True,
              title=f"prefix-tree attention, fwd+bwd: {where}")


def main():
    run_suite("tree", sys.modules[__name__], build_parser().parse_args())


if __name__ == "__main__":
    main()
