"""The unpacked baselines against per-row loops written out by hand."""
import pytest
import torch
import torch.nn.functional as F

from prefix_grouper import GroupLayout, prefix_attention
from prefix_grouper.unpacked import (packed_from_unpacked, unpacked_attention_rows, unpacked_prefix_attention,
                                     unpacked_rows)

PREFIX, SUFFIX = [7, 1, 20], [[1, 7, 3], [5], [2, 9, 0]]


@pytest.fixture
def layout():
    return GroupLayout.from_lengths(PREFIX, SUFFIX)


def test_rows_hold_prefix_then_completion(layout):
    packed = torch.arange(layout.total_tokens) + 1
    rows, lengths = unpacked_rows(packed, layout)
    assert rows.shape == (7, 29)
    assert lengths.tolist() == [8, 14, 10, 6, 22, 29, 20]
    assert layout.unpacked_tokens() == sum(lengths.tolist())
    for j, (b, start, s) in enumerate(zip(layout.completion_group.tolist(), layout.suffix_starts.tolist(),
                                          layout.suffix_lens_list)):
        p0 = layout.prefix_starts[b].item()
        expected = list(range(p0 + 1, p0 + PREFIX[b] + 1)) + list(range(start + 1, start + s + 1))
        assert rows[j].tolist() == expected + [0] * (29 - len(expected))
    assert torch.equal(packed_from_unpacked(rows, layout), packed)


def test_rows_keep_trailing_dims_and_sum_prefix_gradients(layout):
    x = torch.randn(layout.total_tokens, 2, 3, dtype=torch.float64, requires_grad=True)
    rows, _ = unpacked_rows(x, layout)
    assert rows.shape == (7, 29, 2, 3)
    (grad,) = torch.autograd.grad(rows.sum(), x)
    # A prefix token appears once per completion of its group, a completion token once.
    copies = torch.where(layout.token_completion >= 0, 1, layout.group_sizes[layout.token_group])
    assert torch.equal(grad, copies[:, None, None].double().expand_as(x))


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_attention_equals_each_row_alone_and_prefix_attention(layout, softmax_scale):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.total_tokens, h, 8, dtype=torch.float64, generator=g, requires_grad=True)
               for h in (4, 2, 2))
    w = torch.randn(layout.total_tokens, 4, 8, dtype=torch.float64, generator=g)
    out = unpacked_prefix_attention(q, k, v, layout, softmax_scale=softmax_scale)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))

    expected = torch.zeros_like(out)
    for j in range(layout.num_completions):
        b = layout.completion_group[j].item()
        p0, s0 = layout.prefix_starts[b].item(), layout.suffix_starts[j].item()
        tokens = torch.cat([torch.arange(p0, p0 + PREFIX[b]), torch.arange(s0, s0 + layout.suffix_lens_list[j])])
        row = F.scaled_dot_product_attention(*(x[tokens].transpose(0, 1) for x in (q, k, v)), is_causal=True,
                                             scale=softmax_scale, enable_gqa=True).transpose(0, 1)
        expected[tokens] = row.detach()
    # Float64 throughout: the two sides differ only in summation order (~1e-16).
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    reference = prefix_attention(q, k, v, layout, softmax_scale=softmax_scale, backend="reference")
    reference_grads = torch.autograd.grad((reference * w).sum(), (q, k, v))
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for name, a, e in zip("qkv", grads, reference_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"d{name}")


def test_attention_rows_are_causal_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 5, h, 4, generator=g) for h in (4, 2, 2))
    out = unpacked_attention_rows(q, k, v)
    assert out.shape == (3, 5, 4, 4)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_errors(layout):
    with pytest.raises(ValueError, match=r"x must be a tensor \[T=55, \.\.\.\] on the packed axis, got \(40,\)"):
        unpacked_rows(torch.zeros(40), layout)
    with pytest.raises(TypeError, match="layout must be a GroupLayout, got list"):
        unpacked_rows(torch.zeros(55), [7])
    with pytest.raises(ValueError, match=r"x is on meta but the layout is on cpu"):
        unpacked_rows(torch.zeros(55, device="meta"), layout)
    with pytest.raises(ValueError, match=r"rows must be \[N, L, \.\.\.\] = \[7, 29, \.\.\.\]"):
        packed_from_unpacked(torch.zeros(7, 28), layout)
    with pytest.raises(ValueError, match=r"k_rows must be \[N, L, heads, head_dim\], got \(3, 5, 4\)"):
        unpacked_attention_rows(torch.zeros(3, 5, 2, 4), torch.zeros(3, 5, 4), torch.zeros(3, 5, 2, 4))
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
        unpacked_attention_rows(*(torch.zeros(1, 2, 1, 4) for _ in range(3)), softmax_scale=0.0)
    with pytest.raises(ValueError, match=r"v must be a tensor \[T=55, \.\.\.\]"):
        unpacked_prefix_attention(torch.zeros(55, 2, 4), torch.zeros(55, 2, 4), torch.zeros(54, 2, 4), layout)
