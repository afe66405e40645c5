"""A transformers model on a prefix-tree layout gives every sequence's own forward.

A tiny randomly initialized Qwen2 (GQA, rotary embeddings, biases on q/k/v) in float64 with
its RMSNorms kept in float64 (``keep_norms_in_float64``), so the packed and per-sequence
forwards differ only in summation order (~1e-15 relative). We allow 1e-10; a token that sees
a sibling branch, or a wrong position id, moves these logits by more than 1e-2.
"""
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefix_grouper import GroupLayout  # noqa: E402
from prefix_grouper.integrations.transformers import (  # noqa: E402
    completion_logits, packed_logits, sequence_log_probs)
from prefix_grouper.trainers.model import keep_norms_in_float64  # noqa: E402

TOL = 1e-10  # see the module docstring
VOCAB = 61
BACKENDS = ["reference", "torch"]


def tiny_model():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).double()
    keep_norms_in_float64(model)
    model.set_attn_implementation("sdpa")
    return model


def random_sequences(seed: int) -> list[torch.Tensor]:
    """Root-to-leaf paths of a random trie (random depth, branching and ragged segments), plus
    an exact duplicate, a sequence that is a prefix of another, and a one-token sequence."""
    rng = random.Random(seed)

    def grow(path: list[int], depth: int) -> list[list[int]]:
        path = path + [rng.randrange(VOCAB) for _ in range(rng.choice([1, 2, 5, 7]))]
        if depth == 0 or rng.random() < 0.25:
            return [path]
        return [leaf for _ in range(rng.randint(1, 3)) for leaf in grow(path, depth - 1)]

    paths = [leaf for _ in range(rng.randint(1, 3)) for leaf in grow([], rng.randint(1, 4))]
    paths.append(list(paths[0]))
    longest = max(paths, key=len)
    paths.append(longest[:rng.randint(1, len(longest))])
    paths.append([rng.randrange(VOCAB)])
    rng.shuffle(paths)
    return [torch.tensor(p, dtype=torch.long) for p in paths]


def own_forward(model, sequence: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sequence[None]).logits[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_packed_logits_equal_each_sequences_own_forward(backend, seed):
    model = tiny_model()
    sequences = random_sequences(seed)
    layout = GroupLayout.from_sequences(sequences)
    packed_ids = layout.pack_sequences(sequences)
    assert layout.total_tokens < sum(len(s) for s in sequences)  # the duplicate is shared at least
    with torch.no_grad():
        logits = packed_logits(model, layout, packed_ids, backend=backend)
    assert logits.shape == (layout.total_tokens, VOCAB)
    for i, sequence in enumerate(sequences):
        positions = layout.sequence_positions(i)
        assert torch.equal(packed_ids[positions], sequence)
        torch.testing.assert_close(logits[positions], own_forward(model, sequence), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_log_probs_and_gradients_equal_each_sequences_own(backend):
    sequences = random_sequences(7)
    # Score each sequence's last half, at least one token where there is one to predict.
    completion_lens = [min(len(s) - 1, max(1, len(s) // 2)) for s in sequences]
    model, baseline = tiny_model(), tiny_model()
    layout = GroupLayout.from_sequences(sequences)
    log_probs, mask = sequence_log_probs(model, layout, layout.pack_sequences(sequences), completion_lens,
                                         backend=backend, temperature=0.7)
    expected_rows = []
    for sequence, count in zip(sequences, completion_lens):
        logits = baseline(input_ids=sequence[None]).logits[0, :-1] / 0.7
        per_token = torch.log_softmax(logits, -1).gather(-1, sequence[1:, None])[:, 0]
        expected_rows.append(per_token[len(per_token) - count:])
    assert mask.sum(1).tolist() == completion_lens and log_probs.dtype == torch.float64
    torch.testing.assert_close(log_probs[mask], torch.cat(expected_rows), rtol=TOL, atol=TOL)
    # Every token's log-prob, and every parameter's gradient of their weighted sum.
    weights = torch.linspace(0.5, 2.0, int(mask.sum()), dtype=torch.float64)
    grads = torch.autograd.grad((log_probs[mask] * weights).sum(), list(model.parameters()))
    expected = torch.autograd.grad((torch.cat(expected_rows) * weights).sum(), list(baseline.parameters()))
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=TOL, atol=TOL * max(1.0, want.abs().max().item()))


def test_token_log_prob_positions_predict_each_sequences_tokens():
    sequences = random_sequences(3)
    layout = GroupLayout.from_sequences(sequences)
    packed_ids = layout.pack_sequences(sequences)
    for i, sequence in enumerate(sequences):
        logit_positions, target_positions = layout.token_log_prob_positions(i)
        positions = layout.sequence_positions(i)
        assert torch.equal(logit_positions, positions[:-1]) and torch.equal(target_positions, positions[1:])
        assert torch.equal(packed_ids[target_positions], sequence[1:])


def test_packed_logits_on_a_grpo_layout_equal_completion_logits():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (p,), generator=g) for p in (6, 1)]
    completions = [torch.randint(0, VOCAB, (s,), generator=g) for s in (3, 4, 2)]
    layout = GroupLayout.from_lengths([6, 1], [[3, 4], [2]])
    with torch.no_grad():
        expected, _ = completion_logits(model, layout, prompts, completions, backend="torch")
        logits = packed_logits(model, layout, layout.pack(prompts, completions), backend="torch")
        kept = packed_logits(model, layout, layout.pack(prompts, completions),
                             positions=layout.completion_logit_positions(), backend="torch")
    torch.testing.assert_close(logits[layout.completion_logit_positions()], expected, rtol=TOL, atol=TOL)
    torch.testing.assert_close(kept, expected, rtol=TOL, atol=TOL)


def test_packed_logits_refuse_bad_arguments():
    model = tiny_model()
    layout = GroupLayout.from_lengths([3], [[2]])
    ids = torch.arange(5)
    with pytest.raises(TypeError, match="layout must be a GroupLayout"):
        packed_logits(model, None, ids)
    with pytest.raises(TypeError, match="packed_ids must be a 1-D integer tensor"):
        packed_logits(model, layout, ids.double())
    with pytest.raises(ValueError, match="packed_ids has 4 tokens but the layout packs 5"):
        packed_logits(model, layout, ids[:4])
    with pytest.raises(TypeError, match="positions must be a 1-D int64 tensor"):
        packed_logits(model, layout, ids, positions=[0, 1])


def test_packed_logits_refuse_a_run_without_prefix_attention(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.qwen2 import modeling_qwen2

    class HardcodedSdpa:
        @staticmethod
        def get_interface(name, default):
            return sdpa_attention_forward

    monkeypatch.setattr(modeling_qwen2, "ALL_ATTENTION_FUNCTIONS", HardcodedSdpa())
    layout = GroupLayout.from_lengths([3], [[2]])
    with pytest.raises(RuntimeError, match="no attention layer of Qwen2ForCausalLM ran prefix_grouper's attention"):
        packed_logits(tiny_model(), layout, torch.arange(5))


def test_sequence_log_probs_refuse_bad_completion_lens():
    sequences = [torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])]
    layout = GroupLayout.from_sequences(sequences)
    ids = layout.pack_sequences(sequences)
    with pytest.raises(ValueError, match="completion_lens has 1 entries, the layout packs 2 sequences"):
        sequence_log_probs(tiny_model(), layout, ids, [1])
    with pytest.raises(ValueError, match=r"completion_lens\[0\] = 3: sequence 0 has 3 tokens"):
        sequence_log_probs(tiny_model(), layout, ids, [3, 1])
