"""backend="flash" on a GPU: the FlashAttention-2 varlen engines, bf16/fp16, against float64.

The rule (flash-attn's own): the error of every output and gradient against the float64
reference is at most 2x the error of plain PyTorch attention computed in the same low
precision (+ 1e-5 for values that round to zero). Skipped without CUDA.
"""
import pytest
import torch
from attention_oracle import masked_attention, random_tree_sequences

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper._dispatch import BackendUnavailableError
from prefix_grouper.attention import available_backends, flash_engine, prefix_sharing_mask
from prefix_grouper.attention.flash_engines import select_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or "flash" not in available_backends("cuda"),
                                reason="backend='flash' needs a CUDA GPU with FlashAttention kernels")
DEVICE = "cuda"


def dense_low_precision(q, k, v, layout, scale, window=None, sinks=None):
    """Plain PyTorch attention in the inputs' dtype under the explicit mask (the baseline; lse in float32)."""
    return masked_attention(q, k, v, prefix_sharing_mask(layout, window), scale, sinks=sinks, lse_dtype=torch.float32)


def grads(fn, q, k, v, out_weight, lse_weight):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves)
    loss = (out.double() * out_weight).sum() + (lse.double() * lse_weight).sum()
    return [out, lse, *torch.autograd.grad(loss, leaves)]


LAYOUTS = {
    "ragged": lambda: GroupLayout.from_lengths([300, 1000, 64], [[0, 129, 500, 1], [7, 300], [200] * 8], device=DEVICE),
    "g1": lambda: GroupLayout.from_lengths([97, 1], [[7], [97]], device=DEVICE),
    "tree": lambda: GroupLayout.from_sequences([[t * 7 for t in s] * 9 for s in random_tree_sequences(3)],
                                               device=DEVICE),
}
FEATURES = {"plain": {}, "window": {"window": 96}, "sinks": {"sinks": True}, "window-sinks": {"window": 33, "sinks": True}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 128)])
def test_prefix_attention_flash_gpu_within_twice_pytorch_low_precision_error(layout_name, feature, hq, hkv, d, dtype):
    layout = LAYOUTS[layout_name]()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    t = layout.total_tokens
    q, k, v = (torch.randn(t, h, d, generator=g, device=DEVICE).to(dtype) for h in (hq, hkv, hkv))
    features = dict(FEATURES[feature])
    sinks = torch.randn(hq, generator=g, device=DEVICE) if features.pop("sinks", False) else None
    window = features.get("window")
    scale = d ** -0.5
    out_weight = torch.randn(t, hq, d, generator=g, device=DEVICE, dtype=torch.float64)
    lse_weight = torch.randn(t, hq, generator=g, device=DEVICE, dtype=torch.float64)

    def flash(*x):
        return prefix_attention(*x, layout, backend="flash", return_lse=True, sinks=sinks, **features)

    got = grads(flash, q, k, v, out_weight, lse_weight)
    baseline = grads(lambda *x: dense_low_precision(*x, layout, scale, window, sinks), q, k, v, out_weight, lse_weight)
    want = grads(lambda *x: prefix_attention(*x, layout, backend="reference", return_lse=True,
                                             sinks=None if sinks is None else sinks.double(), **features),
                 q.double(), k.double(), v.double(), out_weight, lse_weight)
    for name, a, b, w in zip(("out", "lse", "dq", "dk", "dv"), got, baseline, want):
        err = (a.double() - w).abs().max().item()
        baseline_err = (b.double() - w).abs().max().item()
        assert err <= 2 * baseline_err + 1e-5, (name, err, baseline_err)


def test_prefix_attention_flash_gpu_matches_triton_where_both_run():
    layout = LAYOUTS["ragged"]()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v = (torch.randn(layout.total_tokens, h, 64, generator=g, device=DEVICE, dtype=torch.bfloat16)
               for h in (8, 2, 2))
    if "triton" not in available_backends("cuda"):
        pytest.skip("triton is not available")
    a = prefix_attention(q, k, v, layout, backend="flash")
    b = prefix_attention(q, k, v, layout, backend="triton")
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # two bf16 roundings of O(1) values


def test_prefix_attention_flash_gpu_refuses_float32_and_the_softcap_it_cannot_express():
    layout = LAYOUTS["g1"]()
    q = torch.randn(layout.total_tokens, 2, 64, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="not float32"):
        prefix_attention(q, q, q, layout, backend="flash")
    half = q.bfloat16()
    if not select_engine(half.device, half.dtype).has_softcap:
        with pytest.raises(ValueError, match="softcap"):
            prefix_attention(half, half, half, layout, backend="flash", softcap=30.0)
    with pytest.raises(ValueError, match="head_dim=12"):
        prefix_attention(half[..., :12], half[..., :12], half[..., :12], layout, backend="flash")
    with flash_engine("reference"):  # the reference engine takes float32 on CUDA too
        prefix_attention(q, q, q, layout, backend="flash")


def test_prefix_attention_flash_gpu_no_host_sync_in_forward_and_backward():
    layout = LAYOUTS["ragged"]()
    g = torch.Generator(device=DEVICE).manual_seed(2)
    q, k, v = (torch.randn(layout.total_tokens, h, 64, generator=g, device=DEVICE, dtype=torch.bfloat16)
               .requires_grad_() for h in (4, 2, 2))
    sinks = torch.zeros(4, device=DEVICE, requires_grad=True)
    for window in (None, 40):
        out, lse = prefix_attention(q, k, v, layout, backend="flash", return_lse=True, window=window, sinks=sinks)
        (out.float().sum() + lse.sum()).backward()  # builds and caches the plan
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, lse = prefix_attention(q, k, v, layout, backend="flash", return_lse=True, window=window, sinks=sinks)
            (out.float().sum() + lse.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
