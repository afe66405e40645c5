"""Bad input found by fuzzing gets a clear error naming the argument, not a silent
truncation or a raw torch error; an over-long window means "no limit" on every backend."""
from __future__ import annotations

import pytest
import torch

from prefix_grouper import GroupLayout, fused_linear_log_probs, prefix_attention
from prefix_grouper.logprobs.tokens import check_completion_lens
from prefix_grouper.utils import batch_repeat_cat


# ------------------------------------------------------------------ batch_repeat_cat's num_samples
def test_batch_repeat_cat_repeats_each_prefix_row_its_count():
    prefix, suffix = torch.arange(6.).view(2, 3, 1), torch.zeros(4, 2, 1)
    for counts in ([1, 3], (1, 3), torch.tensor([1, 3]), torch.tensor([1, 3], dtype=torch.int32)):
        out = batch_repeat_cat(prefix, suffix, 1, counts)
        assert out.shape == (4, 5, 1) and torch.equal(out[:, :3], prefix[[0, 1, 1, 1]])
    assert batch_repeat_cat(prefix, torch.zeros(0, 2, 1), 1, [0, 0]).shape == (0, 5, 1)  # G = 0 rows


@pytest.mark.parametrize("counts, error, words", [
    ([1.0, 3.0], TypeError, "integer counts"), ([1.9, 2.1], TypeError, "integer counts"),
    ([True, 3], TypeError, "integer counts"), (torch.tensor([1.0, 3.0]), TypeError, "integer counts"),
    (torch.tensor([True, False]), TypeError, "integer counts"), ("13", TypeError, "list of ints"),
    (4, TypeError, "list of ints"), ([-1, 5], ValueError, ">= 0"), (torch.tensor([5, -1]), ValueError, ">= 0"),
    ([4], ValueError, "one count per prefix row (2)"), ([1, 2, 1], ValueError, "one count per prefix row (2)"),
    ([1, 2], ValueError, "sums to 3 rows, but suffix has 4"), (torch.tensor([[1, 3]]), ValueError, "1-D"),
])
def test_batch_repeat_cat_names_num_samples(counts, error, words):
    with pytest.raises(error, match="num_samples") as info:
        batch_repeat_cat(torch.zeros(2, 3, 1), torch.zeros(4, 2, 1), 1, counts)
    assert words in str(info.value)


# ------------------------------------------------------------------ completion_lens
def test_completion_lens_accepts_ints_and_integer_tensors():
    assert check_completion_lens([2, 0], 2) == check_completion_lens((2, 0), 2) == [2, 0]
    assert check_completion_lens(torch.tensor([2, 0]), 2) == [2, 0]


@pytest.mark.parametrize("lens, error, words", [
    ([2.9, 1.7], TypeError, "completion_lens[0] must be an integer, got float 2.9"),
    ([True, 1], TypeError, "completion_lens[0] must be an integer, got bool"),
    ([2, "1"], TypeError, "completion_lens[1] must be an integer, got str"),
    (2, TypeError, "completion_lens must be a list of ints or a 1-D integer tensor"),
    ("21", TypeError, "completion_lens must be a list of ints"),
    (torch.tensor([2.0, 1.0]), TypeError, "completion_lens must hold integer token counts"),
    (torch.tensor([2, -1]), ValueError, "completion_lens[1] = -1"),
    ([2, -1], ValueError, "completion_lens[1] must be an integer >= 0"),
    ([2], ValueError, "completion_lens has 1 entries, the layout packs 2 sequences"),
])
def test_completion_lens_are_refused_not_truncated(lens, error, words):
    with pytest.raises(error) as info:
        check_completion_lens(lens, 2)
    assert words in str(info.value)


# ------------------------------------------------------------------ token ids
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.uint8, torch.int32])
def test_unsigned_token_ids_are_checked_and_used(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 8, generator=generator), torch.randn(11, 8, generator=generator)
    targets = torch.tensor([0, 10, 4])
    expected = fused_linear_log_probs(hidden, weight, targets, backend="torch")
    assert torch.equal(fused_linear_log_probs(hidden, weight, targets.to(dtype), backend="torch"), expected)


def test_a_token_id_above_2_63_is_reported_as_it_is():
    hidden, weight = torch.zeros(2, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError, match=f"got ids from 1 to {2**63 + 5}$"):
        fused_linear_log_probs(hidden, weight, torch.tensor([1, 2**63 + 5], dtype=torch.uint64), backend="torch")


# ------------------------------------------------------------------ window beyond int64
@pytest.mark.parametrize("window", [2**62, 2**63 - 1, 2**63, 2**70])
def test_a_huge_window_is_no_limit_on_the_reference_backend_too(window):
    """Longest sequence: 6 + 4 = 10 tokens. A window of 10 or more hides nothing; 9 does."""
    layout = GroupLayout.from_lengths([3, 6], [[2, 1], [4]])
    x = torch.randn(layout.total_tokens, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    unlimited = {b: prefix_attention(x, x, x, layout, backend=b) for b in ("reference", "torch")}
    for backend in ("reference", "torch"):
        assert torch.equal(prefix_attention(x, x, x, layout, window=window, backend=backend), unlimited[backend])
        assert torch.equal(prefix_attention(x, x, x, layout, window=10, backend=backend), unlimited[backend])
        assert not torch.allclose(prefix_attention(x, x, x, layout, window=9, backend=backend), unlimited[backend])


@pytest.mark.parametrize("bad, error, match", [
    ([2.9, 1.7], TypeError, r"completion_lens\[0\] must be an integer, got float"),
    ([True, 1], TypeError, r"completion_lens\[0\] must be an integer, got bool"),
    (["2", 1], TypeError, r"completion_lens\[0\] must be an integer, got str"),
    (2, TypeError, "completion_lens must be a list of ints"),
    ([1], ValueError, "completion_lens has 1 entries, the layout packs 2 sequences"),
])
def test_sequence_log_probs_refuses_completion_lens_it_would_truncate(bad, error, match):
    transformers = pytest.importorskip("transformers")
    from prefix_grouper import GroupLayout
    from prefix_grouper.integrations.transformers import sequence_log_probs

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    sequences = [torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5])]
    layout = GroupLayout.from_sequences(sequences)
    packed_ids = layout.pack_sequences(sequences)
    with pytest.raises(error, match=match):
        sequence_log_probs(model, layout, packed_ids, bad)
    log_probs, mask = sequence_log_probs(model, layout, packed_ids, [2, 1])
    assert log_probs.shape == (2, 2) and mask.sum().item() == 3
