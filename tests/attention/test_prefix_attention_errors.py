"""prefix_attention's refusals: every argument it validates names itself, the shape it wanted
and what it got; a backend that cannot run says why and what can (the registry's one format);
flash on the CPU only through its reference engine."""
import pytest
import torch

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper._dispatch import BackendUnavailableError
from prefix_grouper.attention import available_backends, flash_engine


@pytest.fixture
def small():
    layout = GroupLayout.from_lengths([3], [[2, 1]])
    t = layout.total_tokens
    return layout, torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)


def test_prefix_attention_error_wrong_rank(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q must be token-first \[T, heads, head_dim\] or \[1, T, heads, "
                                         r"head_dim\].*head-first \[1, heads, T, head_dim\] must be transposed"
                                         r".*got q of shape \(4, 8\)"):
        prefix_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match=r"k must be \[1, T, heads, head_dim\]"):
        prefix_attention(q[None], k, v[None], layout)
    with pytest.raises(ValueError, match=r"q must be \[1, T, heads, head_dim\]"):
        prefix_attention(torch.stack([q, q]), torch.stack([k, k]), torch.stack([v, v]), layout)


def test_prefix_attention_error_tokens_mismatch(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q has 5 tokens but the layout packs T=6: expected token-first "
                                         r"\[T, heads, head_dim\].*got q of shape \(5, 4, 8\)"):
        prefix_attention(q[:5], k[:5], v[:5], layout)


def test_prefix_attention_error_head_first_layout_is_named(small):
    """transformers hands attention functions [1, H, T, D]: the error says so and how to fix it."""
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q has 4 tokens but the layout packs T=6: it looks head-first "
                                         r"\(\[1, heads, T, head_dim\]\).*x.transpose\(1, 2\).*"
                                         r"got q of shape \(1, 4, 6, 8\)"):
        prefix_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), layout)


def test_prefix_attention_error_heads(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        prefix_attention(q, torch.randn(6, 3, 8), torch.randn(6, 3, 8), layout)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        prefix_attention(q, k, v[:, :1], layout)
    with pytest.raises(ValueError, match="head_dim 4 must equal q head_dim 8"):
        prefix_attention(q, k[..., :4], v[..., :4], layout)
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\], got 300"):
        prefix_attention(torch.randn(6, 1, 300), torch.randn(6, 1, 300), torch.randn(6, 1, 300), layout)


def test_prefix_attention_error_dtype(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        prefix_attention(q, k.double(), v, layout)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.int64"):
        prefix_attention(q.long(), k.long(), v.long(), layout)


def test_prefix_attention_error_device(small):
    layout, q, k, v = small
    meta = GroupLayout.from_lengths([3], [[2, 1]], device="meta")
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        prefix_attention(q, k.to("meta"), v, layout)
    with pytest.raises(ValueError, match="layout is on meta but q is on cpu"):
        prefix_attention(q, k, v, meta)


def test_prefix_attention_error_layout_and_scale(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match="layout must be a GroupLayout"):
        prefix_attention(q, k, v, [3, 2, 1])
    with pytest.raises(ValueError, match="softmax_scale must be .*got nan"):
        prefix_attention(q, k, v, layout, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="softmax_scale must be a real number, got bool"):
        prefix_attention(q, k, v, layout, softmax_scale=True)
    with pytest.raises(TypeError, match="return_lse must be True or False"):
        prefix_attention(q, k, v, layout, return_lse="yes")


def test_prefix_attention_error_backend(small, monkeypatch):
    layout, q, k, v = small
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(q, k, v, layout, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' is not available on cpu"):
        prefix_attention(q, k, v, layout, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="backend='triton' is not available on cpu for float64: .*support float16, "
                                        "bfloat16 and float32"):
        prefix_attention(q.double(), k.double(), v.double(), layout, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="Triton interpreter.*not bfloat16"):
            prefix_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, backend="triton")


@pytest.mark.parametrize("scale", [1e300, 1e39, 1e-300, 1e-46])
def test_prefix_attention_error_scale_outside_float32(small, scale):
    """The kernels multiply by softmax_scale * log2(e) in float32: it must be finite and nonzero there."""
    layout, q, k, v = small
    with pytest.raises(ValueError, match="softmax_scale .*float32"):
        prefix_attention(q, k, v, layout, softmax_scale=scale)


def test_prefix_attention_error_zero_heads(small):
    layout, q, k, v = small
    with pytest.raises(ValueError, match=r"q must have at least one head, got shape \(6, 0, 8\)"):
        prefix_attention(q[:, :0], k, v, layout)
    with pytest.raises(ValueError, match=r"k must have at least one head, got shape \(6, 0, 8\)"):
        prefix_attention(q, k[:, :0], v[:, :0], layout)


@pytest.mark.parametrize("window,error,message", [
    (0, ValueError, r"window must be an integer >= 1, got 0"),
    (-3, ValueError, r"window must be an integer >= 1, got -3"),
    (True, TypeError, r"window must be an integer, got bool"),
    (2.0, TypeError, r"window must be an integer, got float"),
    (torch.tensor(2), TypeError, r"window must be an integer, got Tensor"),
])
def test_prefix_attention_error_window(small, window, error, message):
    layout, q, k, v = small
    with pytest.raises(error, match=message):
        prefix_attention(q, k, v, layout, window=window)


@pytest.mark.parametrize("softcap,error,message", [
    (0.0, ValueError, r"softcap must be a positive finite number, got 0.0"),
    (-1.0, ValueError, r"softcap must be a positive finite number, got -1.0"),
    (float("inf"), ValueError, r"softcap must be a positive finite number, got inf"),
    (float("nan"), ValueError, r"softcap must be a real number, got nan"),
    (True, TypeError, r"softcap must be a real number, got bool"),
    ("30", TypeError, r"softcap must be a real number, got str"),
    (1e-50, ValueError, r"softcap must be in \[.*\] \(finite and nonzero in float32"),
])
def test_prefix_attention_error_softcap(small, softcap, error, message):
    layout, q, k, v = small
    with pytest.raises(error, match=message):
        prefix_attention(q, k, v, layout, softcap=softcap)


def test_prefix_attention_error_sinks(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match=r"sinks must be a torch.Tensor of shape \[Hq\] = \[4\] or None, got list"):
        prefix_attention(q, k, v, layout, sinks=[0.0] * 4)
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\] = \[4\] .*got \(2,\)"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(2))  # Hkv, not Hq
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\] = \[4\] .*got \(1, 4\)"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"sinks must have a floating-point dtype, got torch.int64"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sinks is on meta but q is on cpu"):
        prefix_attention(q, k, v, layout, sinks=torch.zeros(4, device="meta"))


def test_prefix_attention_softmax_scale_is_keyword_only(small):
    layout, q, k, v = small
    with pytest.raises(TypeError, match="positional"):
        prefix_attention(q, k, v, layout, 0.3)


def test_prefix_attention_flash_unavailable_on_cpu_without_the_reference_engine():
    layout = GroupLayout.from_lengths([2], [[1]])
    q = torch.randn(3, 2, 8)
    assert "flash" not in available_backends("cpu")
    with pytest.raises(BackendUnavailableError, match="flash.*needs CUDA tensors.*flash_engine\\('reference'\\)"):
        prefix_attention(q, q, q, layout, backend="flash")
    with flash_engine("reference"):
        assert "flash" in available_backends("cpu")
        prefix_attention(q, q, q, layout, backend="flash")
        assert prefix_attention(q, q, q, layout).shape == q.shape  # "auto" stays torch on CPU
    with flash_engine("torch"), pytest.raises(BackendUnavailableError, match="'torch' engine.*CUDA"):
        prefix_attention(q, q, q, layout, backend="flash")
