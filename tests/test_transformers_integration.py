"""A transformers model on the packed layout gives the unpacked rows' log-probs and grads.

A tiny randomly initialized Qwen2 (GQA, rotary embeddings, biases on q/k/v) in float64;
the baseline is prefix_grouper.unpacked (N padded rows [prompt; completion] through the
model's own attention). Qwen2's RMSNorm rounds to float32 internally whatever the model
dtype, so a last-bit difference in an fp64 attention output can become a 1-ulp fp32
difference (~6e-8 relative) after a norm; we allow 1e-5, far below what a wrong mask or
position id changes (5e-2 on these log-probs: completions that see their siblings).
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

from prefix_grouper import GroupLayout  # noqa: E402
from prefix_grouper.integrations.transformers import (  # noqa: E402
    ATTENTION_NAME, completion_hidden_states, completion_log_probs, install, register, token_log_probs)
from prefix_grouper.unpacked import unpacked_completion_log_probs  # noqa: E402

TOL = 1e-5  # see the module docstring
PROMPT_LENS, COMPLETION_LENS = [7, 1, 12], [[3, 5], [4], [1, 6, 2]]


TINY_CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)
# fused=True against fused=False in float64: both run the same body on the same packed row,
# and differ only in how the head's matmul and log-sum-exp are chunked and ordered (~1e-15
# relative); a head, bias or temperature left out or folded the wrong way moves them by > 1e-2.
FUSED_TOL = 1e-10


def tiny_model(attn_implementation="sdpa", **config_kwargs):
    config = transformers.Qwen2Config(**{**TINY_CONFIG, **config_kwargs})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).double()
    model.set_attn_implementation(attn_implementation)
    return model


def ragged_batch():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (p,), generator=g) for p in PROMPT_LENS]
    completions = [torch.randint(0, 97, (s,), generator=g) for group in COMPLETION_LENS for s in group]
    return GroupLayout.from_lengths(PROMPT_LENS, COMPLETION_LENS), prompts, completions


def assert_same_log_probs_and_grads(model, layout, prompts, completions, tol=TOL, **kwargs):
    """completion_log_probs on ``model`` against the unpacked rows on an identical model."""
    baseline = tiny_model(model.config._attn_implementation.removeprefix(ATTENTION_NAME + "+"))
    expected, mask = unpacked_completion_log_probs(baseline, layout, prompts, completions,
                                                   temperature=kwargs.get("temperature", 1.0))
    expected_grads = torch.autograd.grad((expected * mask).sum(), list(baseline.parameters()))
    log_probs, packed_mask = completion_log_probs(model, layout, prompts, completions, **kwargs)
    grads = torch.autograd.grad((log_probs * packed_mask).sum(), list(model.parameters()))
    assert torch.equal(packed_mask, mask) and mask.sum().item() == layout.num_completion_tokens
    torch.testing.assert_close(log_probs.double()[mask], expected[mask], rtol=tol, atol=tol)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_unswitched_model_gives_the_unpacked_log_probs(attn_implementation):
    """The packed row used to run the model's plain causal attention (completions saw their
    siblings, log-probs off by 5e-2 here) when the model was not switched by hand."""
    model = tiny_model(attn_implementation)
    layout, prompts, completions = ragged_batch()
    assert_same_log_probs_and_grads(model, layout, prompts, completions, backend="torch")
    assert model.config._attn_implementation == f"{ATTENTION_NAME}+{attn_implementation}"


def test_triton_backend_matches_unpacked_rows():
    model = tiny_model().float()  # Triton kernels take fp16/bf16/fp32
    layout, prompts, completions = ragged_batch()
    # An fp32 model against the fp64 unpacked run: fp32 rounding through 2 layers and a
    # 97-way log-softmax stays below 2e-4.
    assert_same_log_probs_and_grads(model, layout, prompts, completions, tol=2e-4, backend="triton")


def test_gradient_checkpointing_recomputes_with_prefix_attention():
    """Non-reentrant checkpointing re-runs the layers during backward, after the forward
    call returned: the recomputation must take the packed path again."""
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    layout, prompts, completions = ragged_batch()
    assert_same_log_probs_and_grads(model, layout, prompts, completions, backend="torch")


def assert_fused_matches_unfused(model, layout, prompts, completions, tol=FUSED_TOL, backend="torch", **kwargs):
    """completion_log_probs with fused=True against fused=False on the same model: log-probs,
    entropies, and the gradients of every parameter for random upstream gradients of both."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fused in (False, True):
        log_probs, entropy, mask = completion_log_probs(model, layout, prompts, completions, backend=backend,
                                                        fused=fused, return_entropy=True, **kwargs)
        assert log_probs.dtype == entropy.dtype == model.dtype and mask.sum() == layout.num_completion_tokens
        upstream = torch.randn((2, *mask.shape), generator=torch.Generator().manual_seed(7), dtype=model.dtype)
        loss = ((upstream[0].to(mask.device) * log_probs + upstream[1].to(mask.device) * entropy) * mask).sum()
        results.append((log_probs, entropy, mask, torch.autograd.grad(loss, parameters)))
    (log_probs, entropy, mask, grads), (fused_log_probs, fused_entropy, fused_mask, fused_grads) = results
    assert torch.equal(fused_mask, mask)
    for fused_value, value in [(fused_log_probs, log_probs), (fused_entropy, entropy), *zip(fused_grads, grads)]:
        torch.testing.assert_close(fused_value, value, rtol=tol, atol=tol)


def linear_head_with_bias(model):
    """Replaces the model's LM head with a random nn.Linear [vocab, hidden] + bias [vocab]."""
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True,
                                    dtype=torch.float64)
    return model


def gradient_checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@pytest.mark.parametrize("make_model, temperature", [
    (tiny_model, 1.0),
    (tiny_model, 0.7),
    (lambda: tiny_model(tie_word_embeddings=True), 1.3),
    (lambda: linear_head_with_bias(tiny_model()), 0.7),
    (lambda: gradient_checkpointed(tiny_model()), 0.7),
], ids=["plain", "temperature", "tied_embeddings", "head_bias", "gradient_checkpointing"])
def test_fused_head_matches_the_model_head(make_model, temperature):
    model = make_model()
    layout, prompts, completions = ragged_batch()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_fused_matches_unfused(model, layout, prompts, completions, temperature=temperature)


@pytest.mark.parametrize("model_name, scaling", [
    ("Cohere", {"logit_scale": 0.25}),            # logits * logit_scale
    ("Granite", {"logits_scaling": 4.0}),         # logits / logits_scaling
    ("HyperCLOVAX", {"logits_scaling": 3.0}),     # logits * logits_scaling
])
def test_fused_head_folds_the_models_logit_scaling(model_name, scaling):
    """The model's own forward (fused=False) applies its scaling; the fused head must fold it
    into the temperature in the same direction (a factor of 4 either way moves every log-prob)."""
    config = getattr(transformers, f"{model_name}Config")(**TINY_CONFIG, **scaling)
    torch.manual_seed(0)
    model = getattr(transformers, f"{model_name}ForCausalLM")(config).double()
    layout, prompts, completions = ragged_batch()
    assert_fused_matches_unfused(model, layout, prompts, completions, temperature=0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton head kernels and cuBLAS need a GPU")
def test_fused_head_on_cuda_matches_the_model_head():
    """fp32 on a GPU: the fused head's Triton kernels (backend "auto") and the prefix
    attention's default backend, against the model's own head."""
    model = linear_head_with_bias(tiny_model()).float().cuda()
    layout, prompts, completions = ragged_batch()
    # fp32 sums of 97 logits and of 32-wide matmuls in different orders: ~1e-6; 1e-4 leaves
    # room for the gradients' larger magnitudes.
    assert_fused_matches_unfused(model, layout.to("cuda"), [p.cuda() for p in prompts],
                                 [c.cuda() for c in completions], tol=1e-4, backend="auto", temperature=0.7)


def test_fused_head_applies_final_logit_softcapping():
    """Gemma 2 caps its logits (config.final_logit_softcapping; 0.05 here, so that the tiny
    random model's logits, up to 0.4, are bent hard): the fused head applies the cap, in fp64
    equal to the model's own logits through fused=False, at temperature 0.7; the cap moves
    log-probs by 0.2."""
    config = transformers.Gemma2Config(**TINY_CONFIG, head_dim=8, final_logit_softcapping=0.05)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).double()
    layout, prompts, completions = ragged_batch()
    assert_fused_matches_unfused(model, layout, prompts, completions, temperature=0.7)
    uncapped_config = transformers.Gemma2Config(**TINY_CONFIG, head_dim=8, final_logit_softcapping=None)
    uncapped = transformers.Gemma2ForCausalLM(uncapped_config).double()
    uncapped.load_state_dict(model.state_dict())
    capped_values, mask = completion_log_probs(model, layout, prompts, completions, fused=True)
    uncapped_values, _ = completion_log_probs(uncapped, layout, prompts, completions, fused=True)
    assert (capped_values - uncapped_values)[mask].abs().max() > 0.1  # the cap changes what is compared


def test_fused_head_refuses_a_logit_scaling_beside_a_softcap():
    config = transformers.Gemma2Config(**TINY_CONFIG, head_dim=8, final_logit_softcapping=30.0)
    config.logit_scale = 0.5
    model = transformers.Gemma2ForCausalLM(config)
    layout, prompts, completions = ragged_batch()
    with pytest.raises(ValueError, match=r"in which order 'gemma2' applies config.logit_scale and "
                                         r"config.final_logit_softcapping"):
        completion_log_probs(model, layout, prompts, completions, fused=True)


def test_fused_head_refuses_a_logit_scaling_of_unknown_direction():
    model = tiny_model(logits_scaling=2.0)
    layout, prompts, completions = ragged_batch()
    with pytest.raises(ValueError, match=r"does not know whether model_type 'qwen2' multiplies or divides its "
                                         r"logits by config.logits_scaling"):
        completion_log_probs(model, layout, prompts, completions, fused=True)


def test_fused_head_refuses_an_output_embedding_that_is_not_linear():
    model = tiny_model()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    layout, prompts, completions = ragged_batch()
    with pytest.raises(TypeError, match="output embedding to be a torch.nn.Linear"):
        completion_log_probs(model, layout, prompts, completions, fused=True)


def test_hidden_states_of_a_model_without_a_separate_body_are_refused():
    body = tiny_model().model  # Qwen2Model: get_decoder() is itself, it has no LM head to leave out
    layout, prompts, completions = ragged_batch()
    with pytest.raises(TypeError, match="get_decoder\\(\\) returns its body without the LM head, got Qwen2Model"):
        completion_hidden_states(body, layout, prompts, completions)


@pytest.mark.parametrize("argument", ["fused", "return_entropy"])
def test_fused_and_return_entropy_must_be_bools(argument):
    layout, prompts, completions = ragged_batch()
    with pytest.raises(TypeError, match=f"{argument} must be True or False"):
        completion_log_probs(tiny_model(), layout, prompts, completions, **{argument: 1})


def test_entropy_of_a_banned_token_is_finite_with_finite_gradient():
    logits = torch.tensor([[0.5, -math.inf, 1.0], [2.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    log_probs, entropy = token_log_probs(logits, torch.tensor([0, 2]), return_entropy=True)
    probs = torch.softmax(logits.detach()[0, [0, 2]], -1)
    torch.testing.assert_close(entropy[0], -(probs * probs.log()).sum(), rtol=1e-12, atol=1e-12)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1] == 0


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_generate_and_other_calls_are_unchanged(attn_implementation):
    model = tiny_model(attn_implementation).eval()
    layout, prompts, completions = ragged_batch()
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    before = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False)
    padded_logits_before = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits
    completion_log_probs(model, layout, prompts, completions, backend="torch")
    after = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(before, after)
    # equal_nan: eager attention leaves NaN on the fully masked left-padding queries.
    torch.testing.assert_close(model(input_ids=prompt_ids, attention_mask=prompt_mask).logits, padded_logits_before,
                               rtol=0, atol=0, equal_nan=True)


def test_install_is_idempotent_and_keeps_the_strict_implementation():
    model = tiny_model()
    assert install(model) == install(model) == f"{ATTENTION_NAME}+sdpa"
    register()
    strict = tiny_model(ATTENTION_NAME)
    assert install(strict) == ATTENTION_NAME


@pytest.mark.parametrize("fused", [False, True])
def test_attention_outside_attention_interface_raises(monkeypatch, fused):
    """A model whose layers do not dispatch through transformers' AttentionInterface would
    run the packed row through plain causal attention: refuse instead."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class HardcodedSdpa:
        @staticmethod
        def get_interface(name, default):
            return sdpa_attention_forward

    monkeypatch.setattr(modeling_qwen2, "ALL_ATTENTION_FUNCTIONS", HardcodedSdpa())
    layout, prompts, completions = ragged_batch()
    with pytest.raises(RuntimeError, match="no attention layer of Qwen2ForCausalLM ran prefix_grouper's attention"):
        completion_log_probs(tiny_model(), layout, prompts, completions, fused=fused)


def test_model_that_refuses_the_implementation_raises(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(model, "_can_set_attn_implementation", lambda: False)
    layout, prompts, completions = ragged_batch()
    with pytest.raises(RuntimeError, match=r"Qwen2ForCausalLM did not accept attn_implementation='prefix_grouper\+sdpa'"):
        completion_log_probs(model, layout, prompts, completions)


def test_packed_call_with_a_dense_mask_raises():
    model = tiny_model()
    install(model)
    layout, prompts, completions = ragged_batch()
    packed = layout.pack(prompts, completions)
    with pytest.raises(ValueError, match="takes its mask from the layout"):
        model(input_ids=packed[None], position_ids=layout.position_ids[None], use_cache=False, prefix_layout=layout)


def test_strict_implementation_errors_name_the_missing_layout():
    register()
    model = tiny_model(ATTENTION_NAME)
    with pytest.raises(ValueError, match="needs the batch's GroupLayout: call the model with prefix_layout"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    layout = GroupLayout.from_lengths([3], [[2]])
    with pytest.raises(ValueError, match=r"head-first layout on one packed row: query \[1, heads, T, head_dim\].*"
                                         r"got query \(2, 4, 5, 8\)"):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long), prefix_layout=layout)


def test_temperature_scales_both_paths_alike():
    model = tiny_model()
    layout, prompts, completions = ragged_batch()
    assert_same_log_probs_and_grads(model, layout, prompts, completions, backend="torch", temperature=0.7)


@pytest.mark.parametrize("temperature, error", [
    (0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("1", TypeError),
    (True, TypeError),
])
def test_bad_temperature_is_refused(temperature, error):
    model = tiny_model()
    layout, prompts, completions = ragged_batch()
    for fn in (completion_log_probs, unpacked_completion_log_probs):
        with pytest.raises(error, match="temperature"):
            fn(model, layout, prompts, completions, temperature=temperature)
    with pytest.raises(error, match="temperature"):
        token_log_probs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature)


def test_token_log_probs_shape_errors():
    with pytest.raises(ValueError, match=r"logits must be a floating-point \[M, vocab\] tensor, got \(2, 3, 4\)"):
        token_log_probs(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be a \[M=2\] tensor of token ids, got \(3,\)"):
        token_log_probs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_token_log_probs_in_float32_from_half_logits():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.tensor([0, 3, 10, 2, 2])
    out = token_log_probs(logits, targets, 0.5)
    assert out.dtype == torch.float32
    # The division rounds to bf16 (as in TRL); the log-softmax is exact in fp32 after it.
    expected = torch.log_softmax((logits / 0.5).float(), -1)[torch.arange(5), targets]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def trl_batch():
    """What TRL's GRPOTrainer holds: one left-padded prompt row per completion (each prompt
    repeated on its group's consecutive rows), right-padded completions, pad id 0."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 97, (p,), generator=g) for p in (6, 2, 9)]
    group_sizes, completion_lens = [3, 2, 2], [4, 1, 0, 5, 2, 3, 3]
    rows = [prompts[b] for b, size in enumerate(group_sizes) for _ in range(size)]
    prompt_ids = torch.zeros(len(rows), 9, dtype=torch.long)
    for j, row in enumerate(rows):
        prompt_ids[j, 9 - len(row):] = row
    prompt_mask = (torch.arange(9)[None] >= 9 - torch.tensor([len(r) for r in rows])[:, None]).long()
    completion_mask = (torch.arange(5)[None] < torch.tensor(completion_lens)[:, None]).long()
    completion_ids = torch.randint(1, 97, (len(rows), 5), generator=g) * completion_mask
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def test_trl_shaped_batch_matches_every_row_run_separately():
    prompt_ids, prompt_mask, completion_ids, completion_mask = trl_batch()
    layout = GroupLayout.from_padded(prompt_mask, completion_mask, prompt_ids=prompt_ids)
    assert layout.group_sizes_list == (3, 2, 2)
    model = tiny_model()
    log_probs, mask = completion_log_probs(model, layout, prompt_ids, completion_ids, backend="torch")
    unpacked, _ = unpacked_completion_log_probs(model, layout, prompt_ids, completion_ids)
    assert torch.equal(mask, completion_mask.bool())
    for j in range(prompt_ids.shape[0]):
        prompt = prompt_ids[j][prompt_mask[j].bool()]
        completion = completion_ids[j][completion_mask[j].bool()]
        logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0]
        expected = torch.log_softmax(logits[len(prompt) - 1:-1], -1)[torch.arange(len(completion)), completion]
        torch.testing.assert_close(log_probs[j, :len(completion)], expected, rtol=TOL, atol=TOL)
        torch.testing.assert_close(unpacked[j, :len(completion)], expected, rtol=TOL, atol=TOL)


def test_trl_shaped_batch_fused_log_probs_and_entropies_match_every_row_run_separately():
    """The quantities TRL's GRPO loss takes (per-token log-probs and entropies) from the fused
    head, against each ``[prompt; completion]`` row run alone with full logits."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = trl_batch()
    layout = GroupLayout.from_padded(prompt_mask, completion_mask, prompt_ids=prompt_ids)
    model = tiny_model()
    log_probs, entropy, mask = completion_log_probs(model, layout, prompt_ids, completion_ids, backend="torch",
                                                    temperature=0.8, fused=True, return_entropy=True)
    assert torch.equal(mask, completion_mask.bool())
    for j in range(prompt_ids.shape[0]):
        prompt = prompt_ids[j][prompt_mask[j].bool()]
        completion = completion_ids[j][completion_mask[j].bool()]
        logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1:-1] / 0.8
        expected = torch.log_softmax(logits, -1)
        torch.testing.assert_close(log_probs[j, :len(completion)], expected[torch.arange(len(completion)), completion],
                                   rtol=TOL, atol=TOL)
        torch.testing.assert_close(entropy[j, :len(completion)], -(expected.exp() * expected).sum(-1),
                                   rtol=TOL, atol=TOL)


def test_float32_model_under_bf16_autocast_runs_in_the_autocast_dtype():
    """TRL's default (bf16=True over float32 weights): rotary embeddings leave q and k in
    float32 while v is bf16. prefix_attention refused the mixed dtypes; it now runs in the
    autocast dtype, as sdpa does."""
    layout, prompts, completions = ragged_batch()
    model, baseline = tiny_model().float(), tiny_model().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, mask = completion_log_probs(model, layout, prompts, completions)
        expected, _ = unpacked_completion_log_probs(baseline, layout, prompts, completions)
    # Both sides round attention inputs and matmuls to bf16 (8 mantissa bits) in different
    # orders: measured 3e-4 apart on log-probs near -4.6; a sibling leak moves them by ~0.1.
    torch.testing.assert_close(log_probs[mask], expected[mask], rtol=0, atol=5e-3)



# ---------------------------------------------------------------------------- the one adapter
def test_one_module_registers_every_attention_function():
    """Every registration with transformers lives in prefix_grouper.models.attention."""
    import pathlib

    import prefix_grouper

    root = pathlib.Path(prefix_grouper.__file__).parent
    registering = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                         if "Interface.register(" in path.read_text())
    assert registering == ["models/attention.py"]


def test_packed_and_grouped_calls_share_one_dropout_policy():
    """Dropout is refused where it would apply: a layer in training, or a caller naming no layer;
    a layer in eval mode applies none, in both call structures."""
    from prefix_grouper import PrefixGrouper
    from prefix_grouper.models.attention import call_settings

    layer = torch.nn.Module()
    for grouped in (False, True):
        layer.train()
        with pytest.raises(ValueError, match="does not implement attention dropout"):
            call_settings(layer, {"dropout": 0.1}, grouped=grouped)
        layer.eval()
        assert call_settings(layer, {"dropout": 0.1, "scaling": 0.5}, grouped=grouped)["softmax_scale"] == 0.5
        with pytest.raises(ValueError, match="names no layer"):
            call_settings(None, {"dropout": 0.1}, grouped=grouped)
    grouper = PrefixGrouper([[2, 1, 2]])
    q = torch.randn(*grouper.x_shape[:1], 2, grouper.x_shape[1], 8, dtype=torch.float64)
    torch.testing.assert_close(grouper.forward(None, q, q, q, layer, dropout=0.1), grouper.forward(None, q, q, q))


def test_packed_and_grouped_calls_read_the_same_settings():
    from prefix_grouper.models.attention import call_settings

    kwargs = {"scaling": 0.3, "sliding_window": 4, "softcap": 0.0, "s_aux": None, "is_causal": True}
    want = {"softmax_scale": 0.3, "window": 4, "softcap": None, "sinks": None}
    assert call_settings(None, kwargs, grouped=False) == call_settings(None, kwargs, grouped=True) == want
    # flash-attn's and SDPA's spellings, and the grouper's rows' own keywords, in grouped calls only
    assert call_settings(None, {"softmax_scale": 0.3, "window": 4, "attention_mask": None}, grouped=True)["window"] == 4
    with pytest.raises(TypeError, match="attention keyword\\(s\\) softmax_scale"):
        call_settings(None, {"softmax_scale": 0.3}, grouped=False)
    with pytest.raises(TypeError, match="scaling, softmax_scale say the same thing"):
        call_settings(None, {"scaling": 0.3, "softmax_scale": 0.3}, grouped=True)
    with pytest.raises(ValueError, match="output_attentions"):
        call_settings(None, {"output_attentions": True}, grouped=True)


def test_eager_rerouting_is_idempotent():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from prefix_grouper.models.attention import eager_attention_dispatch, route_eager_attention

    route_eager_attention()
    first = ALL_ATTENTION_FUNCTIONS["eager"]
    route_eager_attention()
    assert ALL_ATTENTION_FUNCTIONS["eager"] is first is eager_attention_dispatch


def test_a_wrapper_keyword_runs_around_every_packed_attention_call():
    """WRAPPER_KWARG (how the verl plugin runs Ulysses) wraps the one adapter without a second
    registration: each layer's call reaches the wrapper with prefix_grouper_attention, and a
    pass-through wrapper changes nothing."""
    from prefix_grouper.models.attention import (LAYOUT_KWARG, WRAPPER_KWARG, install,
                                                 prefix_grouper_attention)

    layout, prompts, completions = ragged_batch()
    model = tiny_model().float()
    install(model)
    ids = layout.pack(prompts, completions)[None]
    positions = layout.position_ids[None]
    calls = []

    def wrapper(attention, module, query, key, value, attention_mask, **kwargs):
        calls.append(attention)
        assert WRAPPER_KWARG not in kwargs
        return attention(module, query, key, value, attention_mask, **kwargs)

    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=positions, **{LAYOUT_KWARG: layout}).logits
        wrapped = model(input_ids=ids, position_ids=positions, **{LAYOUT_KWARG: layout, WRAPPER_KWARG: wrapper}).logits
    assert calls == [prefix_grouper_attention] * model.config.num_hidden_layers
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)
