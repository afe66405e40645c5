"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any
test module imports prefix_grouper.
"""
import os
import shutil

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
