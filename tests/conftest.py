"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any
test module imports prefix_grouper.
"""
import os
import shutil
import subprocess
import sys

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from prefix_grouper import GroupLayout  # noqa: E402


def random_layout(generator: torch.Generator, num_groups: int, choices=(1, 7, 97),
                  max_group=4, device="cpu", allow_empty=True) -> GroupLayout:
    """Ragged layout: P and S drawn from ``choices`` (S may be 0), G in 1..max_group."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    suffix_choices = tuple(choices) + ((0,) if allow_empty else ())
    prefix = [pick(choices) for _ in range(num_groups)]
    suffix = [[pick(suffix_choices) for _ in range(int(torch.randint(1, max_group + 1, (1,),
                                                                     generator=generator)))]
              for _ in range(num_groups)]
    return GroupLayout.from_lengths(prefix, suffix, device=device)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def assert_compiles_for_sm90(script: str, timeout: int) -> None:
    """Run ``script`` (which compiles kernels with ``triton.compile(..., GPUTarget("cuda", 90,
    32))`` and prints "compiled") in a fresh interpreter without TRITON_INTERPRET, so the
    kernels are real JIT functions even on a machine without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def trainer_gradients(trainer, prepared, use_prefix_grouper):
    """``(stats, {parameter name: gradient})`` of one accumulation of ``prepared`` from zero."""
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.accumulate_gradients(prepared, use_prefix_grouper=use_prefix_grouper)
    return stats, {n: p.grad.clone() for n, p in trainer.policy.model.named_parameters()}


def assert_same_gradients(actual, expected):
    """Equal within 1e-10 of each parameter's largest gradient entry: fp64 end to end (norms
    kept in fp64 by load_policy), two paths that differ only in summation order (packed or
    tree against the rows, whole or split batches) are ~1e-15 apart."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert (actual[name] - expected[name]).abs().max().item() <= 1e-10 * scale, name
