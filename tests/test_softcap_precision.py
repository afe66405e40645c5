"""The Triton softcap's tanh (prefix_grouper/triton_math.py) is accurate to float32 rounding
for every cap. A softcap divides the scores (or logits) by the cap before the tanh, so a
large cap puts every argument near 0, where ``(1 - e) / (1 + e)`` cancels: at cap 1e6 the
old formula moved log-probs by 2.5e-2 and attention outputs by 1.2e-3 at cap 1e5.

Runs under TRITON_INTERPRET on CPU (tests/conftest.py); on a GPU, on the compiled kernels.
References are float64 (torch.tanh)."""
import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from prefix_grouper import GroupLayout, fused_linear_log_probs, prefix_attention  # noqa: E402
from prefix_grouper.logprobs.reference import reference_log_probs  # noqa: E402
from prefix_grouper.triton_math import tanh  # noqa: E402

CAPS = [1.0, 30.0, 1e5, 1e6]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(out_ptr + offsets, tanh(tl.load(x_ptr + offsets, mask=inside)), mask=inside)


def triton_tanh(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 4), (torch.float64, 8)])
def test_tanh_is_accurate_to_a_few_ulp_everywhere(dtype, ulps):
    """Relative error against float64 torch.tanh over |x| from 1e-30 to 30, both signs, and
    around the switch from the series to the formula (0.2 and 0.5)."""
    magnitudes = torch.cat([torch.logspace(-30, math.log10(30), 4001, dtype=torch.float64),
                            torch.linspace(0.19, 0.21, 101, dtype=torch.float64),
                            torch.linspace(0.49, 0.51, 101, dtype=torch.float64), torch.tensor([0.0, 100.0, 1e30])])
    x = torch.cat([magnitudes, -magnitudes]).to(dtype)
    got = triton_tanh(x.to(DEVICE)).cpu()
    expected = torch.tanh(x.double())
    relative = ((got.double() - expected).abs() / expected.abs().clamp_min(torch.finfo(dtype).tiny)).max().item()
    assert relative <= ulps * torch.finfo(dtype).eps, relative
    assert torch.equal(got[x == 0], x[x == 0]) and got[x.abs() >= 30].abs().eq(1).all()


@pytest.mark.parametrize("cap", CAPS)
def test_attention_softcap_is_accurate_for_every_cap(cap):
    """float32 inputs through the Triton backend against the float64 reference: the error
    stays at float32 rounding of O(1) outputs for every cap, as the torch backend's does."""
    lengths = [37, 5], [[9, 1, 16], [7]]
    layout, cpu_layout = GroupLayout.from_lengths(*lengths, device=DEVICE), GroupLayout.from_lengths(*lengths)
    generator = torch.Generator().manual_seed(int(cap))
    # Scores of a few units, so that a cap of 1 or 30 bends them and a cap of 1e6 leaves them nearly linear.
    q, k, v = (2 * torch.randn(layout.total_tokens, h, 16, generator=generator) for h in (4, 2, 2))
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    out = prefix_attention(*leaves, layout, softcap=cap, backend="triton")
    expected = prefix_attention(*exact, cpu_layout, softcap=cap, backend="reference")
    weight = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    grads = torch.autograd.grad((out * weight.to(out)).sum(), leaves)
    expected_grads = torch.autograd.grad((expected * weight).sum(), exact)
    assert (out.detach().cpu().double() - expected).abs().max().item() <= 2e-5
    for got, want in zip(grads, expected_grads):
        assert (got.cpu().double() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("cap", CAPS)
def test_log_prob_head_softcap_is_accurate_for_every_cap(cap):
    """The fused head's final-logit softcap (Triton) against the float64 oracle, log-probs
    and the gradient of hidden."""
    generator = torch.Generator().manual_seed(int(cap) + 1)
    hidden = torch.randn(13, 32, generator=generator)
    weight = torch.randn(301, 32, generator=generator) / 2  # logits of a few units
    targets = torch.randint(301, (13,), generator=generator)
    leaf = hidden.to(DEVICE).requires_grad_()
    log_probs = fused_linear_log_probs(leaf, weight.to(DEVICE), targets.to(DEVICE), softcap=cap, backend="triton")
    exact = hidden.double().requires_grad_()
    expected, _ = reference_log_probs(exact, weight, targets, softcap=cap)
    (grad,) = torch.autograd.grad(log_probs.sum(), leaf)
    (expected_grad,) = torch.autograd.grad(expected.sum(), exact)
    error = (log_probs.detach().cpu().double() - expected).abs().max().item()
    assert error <= 1e-4 * max(1.0, expected.abs().max().item())
    assert (grad.cpu().double() - expected_grad).abs().max().item() <= 1e-4 * max(1.0, expected_grad.abs().max().item())
