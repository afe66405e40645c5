"""verl micro-batches as prefix trees: what ``micro_batch_layout`` shares (the issue's two
micro-batches: 3 groups x 2 samples under a 40-token system prompt, 165 -> 85 packed tokens;
2 trajectories x 3 agent steps of history, 312 -> 120), that ``grouped_log_probs`` equals a
plain forward of every sample in log-probs, entropies and gradients on trees, and the
token-budget micro-batches (skipped without verl; run in the verl environment)."""
import numpy as np
import pytest
import torch

from test_verl_integration import (TOL, assert_grads_equal, nested, plain_rolled, ragged_samples,  # noqa: E402
                                   tiny_qwen2, unpadded_micro_batch)

from prefix_grouper.integrations import verl as pg_verl  # noqa: E402
from prefix_grouper.integrations.verl.batching import (group_count_micro_batches,  # noqa: E402
                                                       token_budget_micro_batches)
from prefix_grouper.integrations.verl.tree import packed_token_count, sample_tokens  # noqa: E402


def random_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda n: torch.randint(1, 97, (n,), generator=g)


def system_prompt_batch(seed=0, system_len=40):
    """3 groups x 2 samples: a system prompt, a 5-token question, 5-token responses."""
    rand = random_tokens(seed)
    system, sequences, prompt_lens = rand(system_len), [], []
    for _ in range(3):
        prompt = torch.cat([system, rand(5)])
        sequences += [torch.cat([prompt, rand(5)]) for _ in range(2)]
        prompt_lens += [len(prompt)] * 2
    return sequences, prompt_lens


def history_batch(seed=1, first_len=40):
    """2 trajectories x 3 agent steps: step t's prompt is step t - 1's whole sequence and a
    4-token observation; 4-token actions."""
    rand = random_tokens(seed)
    sequences, prompt_lens = [], []
    for _ in range(2):
        history = rand(first_len)
        for step in range(3):
            prompt = history if step == 0 else torch.cat([history, rand(4)])
            history = torch.cat([prompt, rand(4)])
            sequences.append(history)
            prompt_lens.append(len(prompt))
    return sequences, prompt_lens


def packed(sequences, prompt_lens):
    result = pg_verl.micro_batch_layout(nested(sequences), prompt_lens)
    assert result.layout.total_tokens == packed_token_count(sample_tokens(nested(sequences)), prompt_lens)
    # every sample reads back its own tokens from the packed row
    for i, seq in enumerate(sequences):
        assert torch.equal(result.packed_ids[result.layout.sequence_positions(i)], seq)
    return result.layout.total_tokens


def test_issue_micro_batches_pack_their_trees():
    sequences, prompt_lens = system_prompt_batch()
    assert sum(prompt_lens[::2]) + sum(len(s) - p for s, p in zip(sequences, prompt_lens)) == 165  # one level
    assert packed(sequences, prompt_lens) == 85 == 40 + 3 * (5 + 5 + 5)
    sequences, prompt_lens = history_batch()
    assert sum(map(len, sequences)) == 312  # every step its own row
    assert packed(sequences, prompt_lens) == 120 == 2 * 60  # each trajectory: its last step


def test_what_is_shared_and_what_is_not():
    # A common run of 31 tokens between different prompts stays per group; 32 are shared.
    sequences, prompt_lens = system_prompt_batch(system_len=31)
    assert packed(sequences, prompt_lens) == 3 * (31 + 5 + 5 + 5)
    sequences, prompt_lens = system_prompt_batch(system_len=32)
    assert packed(sequences, prompt_lens) == 32 + 3 * (5 + 5 + 5)
    # A group's prompt is shared however short, also when its samples are not adjacent, and
    # G = 1 samples and empty responses are fine.
    rand = random_tokens(3)
    a, b = rand(3), rand(2)
    sequences = [torch.cat([a, rand(4)]), torch.cat([b, rand(2)]), torch.cat([a, rand(5)]), a.clone()]
    assert packed(sequences, [3, 2, 3, 3]) == 3 + 4 + 5 + 0 + 2 + 2
    # The first step of a trajectory shorter than 32 tokens is not shared with the next step's
    # prompt; from 32 tokens on it is.
    sequences, prompt_lens = history_batch(first_len=20)
    assert packed(sequences, prompt_lens) == 2 * (24 + 40)  # 24 < 32: step 1 alone; 32: shared
    sequences, prompt_lens = history_batch(first_len=28)
    assert packed(sequences, prompt_lens) == 2 * 48


@pytest.mark.parametrize("batch", ["system prompt", "history", "ragged"])
def test_grouped_log_probs_on_trees_match_plain_forward(batch):
    sequences, prompt_lens = {"system prompt": system_prompt_batch, "history": history_batch,
                              "ragged": ragged_samples}[batch]()
    micro_batch = unpadded_micro_batch(sequences, prompt_lens)
    assert not pg_verl.micro_batch_layout(micro_batch["input_ids"], prompt_lens).layout.is_flat
    model, baseline = tiny_qwen2(), tiny_qwen2()
    log_probs, entropy = pg_verl.grouped_log_probs(model, model, micro_batch, temperature=0.7,
                                                   calculate_entropy=True)
    expected, expected_entropy = plain_rolled(baseline, sequences, prompt_lens)
    assert torch.equal(log_probs.offsets(), micro_batch["input_ids"].offsets())
    torch.testing.assert_close(log_probs.values(), expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(entropy.values(), expected_entropy, atol=TOL, rtol=TOL)
    w = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert_grads_equal((log_probs.values() * w + entropy.values() * w.flip(0)).sum(), model,
                       (expected * w + expected_entropy * w.flip(0)).sum(), baseline)


def host(sequences):
    return [s.numpy().astype(np.int64) for s in sequences]


def test_token_budget_micro_batches():
    sequences, prompt_lens = system_prompt_batch()
    tokens = host(sequences)
    assert [sorted(p) for p in token_budget_micro_batches(tokens, prompt_lens, 85)] == [[0, 1, 2, 3, 4, 5]]
    for budget, count in ((55, 3), (70, 2), (84, 2)):  # a group packs 55 tokens, two 70
        parts = token_budget_micro_batches(tokens, prompt_lens, budget)
        assert sorted(sum(parts, [])) == list(range(6)) and len(parts) == count
        assert all(packed_token_count([tokens[i] for i in p], [prompt_lens[i] for i in p]) <= budget for p in parts)
        assert all(len({i // 2 for i in p}) * 2 == len(p) for p in parts)  # whole groups
    parts = token_budget_micro_batches(tokens, prompt_lens, 52)  # a group over the budget: split
    assert sorted(map(len, parts)) == [1] * 6
    # a trajectory's steps go together
    sequences, prompt_lens = history_batch()
    parts = token_budget_micro_batches(host(sequences), prompt_lens, 60)
    assert sorted(sorted(p) for p in parts) == [[0, 1, 2], [3, 4, 5]]
    # an equal count over ranks: halves, cut between trajectories first
    parts = token_budget_micro_batches(host(sequences), prompt_lens, 120, count=2)
    assert sorted(sorted(p) for p in parts) == [[0, 1, 2], [3, 4, 5]]
    assert len(token_budget_micro_batches(host(sequences), prompt_lens, 120, count=6)) == 6
    with pytest.raises(ValueError, match="only 6 samples"):
        token_budget_micro_batches(host(sequences), prompt_lens, 120, count=7)
    with pytest.raises(ValueError, match="sample 2 has 60 tokens"):
        token_budget_micro_batches(host(sequences), prompt_lens, 59)


def test_group_count_micro_batches():
    sequences, prompt_lens = ragged_samples()  # groups of 3, 1 and 2 samples
    tokens = host(sequences)
    assert group_count_micro_batches(tokens, prompt_lens, 1) == [[0, 1, 2], [3], [4, 5]]
    assert group_count_micro_batches(tokens, prompt_lens, 2) == [[0, 1, 2, 3], [4, 5]]
    assert group_count_micro_batches(tokens, prompt_lens, 2, count=3) == [[0, 1, 2], [3], [4, 5]]
    assert group_count_micro_batches(tokens, prompt_lens, 5, count=2) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="micro_batch_size_per_gpu must be >= 1"):
        group_count_micro_batches(tokens, prompt_lens, 0)
