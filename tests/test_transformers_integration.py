"""A transformers model on the packed layout gives the naive layout's log-probs and grads.

A tiny randomly initialized Qwen2 (GQA, rotary embeddings, biases on q/k/v) in float64:
the naive run is G padded rows [prompt; completion] through SDPA, as a GRPO loop does
it. Qwen2's RMSNorm rounds to float32 internally whatever the model dtype, so a last-bit
difference in an fp64 attention output can become a 1-ulp fp32 difference (~6e-8
relative) after a norm; we allow 1e-5 relative, far below what a wrong mask or position
id would change (order 1e-2).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefix_grouper import GroupLayout  # noqa: E402
from prefix_grouper.integrations.transformers import ATTENTION_NAME, completion_log_probs, register  # noqa: E402


def tiny_model(attn_implementation):
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).double()
    model.set_attn_implementation(attn_implementation)
    return model


def naive_log_probs(model, prompts, completions, group_of):
    """Right-padded naive rows through the model; log-probs of each completion token."""
    rows = [torch.cat([prompts[group_of[j]], c]) for j, c in enumerate(completions)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = r
        mask[j, :len(r)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    log_probs = torch.log_softmax(logits, -1)
    max_s = max(len(c) for c in completions)
    out = torch.zeros(len(rows), max_s, dtype=log_probs.dtype)
    for j, c in enumerate(completions):
        p = len(prompts[group_of[j]])
        for s in range(len(c)):
            out[j, s] = log_probs[j, p + s - 1, c[s]]
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_model_matches_naive_rows(backend):
    register()
    g = torch.Generator().manual_seed(3)
    prompt_lens, completion_lens = [7, 1, 12], [[3, 5], [4], [1, 6, 2]]
    prompts = [torch.randint(0, 97, (p,), generator=g) for p in prompt_lens]
    completions = [torch.randint(0, 97, (s,), generator=g) for group in completion_lens for s in group]
    group_of = [b for b, group in enumerate(completion_lens) for _ in group]
    layout = GroupLayout.from_lengths(prompt_lens, completion_lens)

    naive_model = tiny_model("sdpa")
    expected = naive_log_probs(naive_model, prompts, completions, group_of)
    expected_grads = torch.autograd.grad(expected.sum(), list(naive_model.parameters()))

    grouped_model = tiny_model(ATTENTION_NAME)
    if backend == "triton":
        grouped_model.float()  # Triton kernels take fp16/bf16/fp32
    log_probs, mask = completion_log_probs(grouped_model, layout, prompts, completions, backend=backend)
    grads = torch.autograd.grad((log_probs * mask).sum(), list(grouped_model.parameters()))

    tol = 1e-5 if backend == "torch" else 2e-4  # triton: an fp32 model against the fp64 naive run
    assert mask.sum().item() == sum(len(c) for c in completions)
    torch.testing.assert_close(log_probs.double()[mask], expected.double()[mask], rtol=tol, atol=tol)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol)


def test_errors_name_the_missing_layout():
    register()
    model = tiny_model(ATTENTION_NAME)
    with pytest.raises(ValueError, match="needs the batch's GroupLayout: call the model with prefix_layout"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    layout = GroupLayout.from_lengths([3], [[2]])
    with pytest.raises(ValueError, match="runs on one packed row"):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long), prefix_layout=layout)
